from testapp.webtasks import make

off = make("embedded")
celery = off.celery
