from testapp.reliable import make

off = make("rabbitmq")
celery = off.celery
