"""Gateway settings plus one extra route: a bare async view, the framework's floor."""

from gateway_project.settings import *  # noqa: F403

ROOT_URLCONF = "bench.urls"
