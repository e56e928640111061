from testapp.reliable import make

off = make("redis")
celery = off.celery
