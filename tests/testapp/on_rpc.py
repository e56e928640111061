from testapp import make

off = make("rpc")
celery = off.celery
