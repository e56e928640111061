from testapp import make

off = make("redis")
celery = off.celery
