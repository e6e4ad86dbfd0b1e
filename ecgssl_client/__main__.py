"""``python -m ecgssl_client``: the ``ecgssl`` command."""

from ecgssl_client.cli import main

main()
