"""Test helpers shared by every test folder, one importable package (``from support.X import``).

- ``support.bundles``: the shared cifar_resnet20 bundle, sample images, reference logits;
- ``support.fakes``: in-process fakes of the cloud and edge peers (unit tests only);
- ``support.background``: an asyncio loop on a thread, HTTP helpers;
- ``support.cloud``: a cloud server on a thread and a raw protocol client;
- ``support.curve``: CURVE key files (server, an allowed edge, a stranger);
- ``support.procs``: daemons as real processes (ports, start/stop, metrics).
"""
