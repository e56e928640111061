from testapp import make

off = make("rabbitmq")
celery = off.celery
