from testapp import make

off = make("embedded")
celery = off.celery
