"""edgefleet: small language models on fleets of edge devices.

The one import namespace of the distribution. The repository keeps the product's top-level
folders (``agent/``, ``controlplane/``, ``protos/``); the links beside this file make them
``edgefleet.agent``, ``edgefleet.controlplane`` and ``edgefleet.protos``, which is how every
module, test and benchmark imports them and how they install. Nothing else goes into
site-packages.
"""
