"""A Pyramid app keeping its Offload in the registry, loaded from an ini file."""

from pyramid.config import Configurator

from offload import Offload
from testapp.local import local_settings


def main(global_config, **settings):
    config = Configurator(settings=settings)
    config.registry["offload"] = Offload(local_settings("pyramid"))
    return config.make_wsgi_app()
