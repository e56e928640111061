from testapp.webtasks import make

off = make("redis")
celery = off.celery
