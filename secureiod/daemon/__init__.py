"""The secureiod daemon, split by concern like wireguard-go's ``device/``.

* ``loop`` — the event loop and timers; ``ports`` — the typed ports adapters are seen through;
* ``receive`` — UDP → demultiplexer → session → checks → TUN; ``send`` — TUN → allowed IPs →
  session → UDP;
* ``peer`` — one peer's session, endpoint and counters; ``lifecycle`` — keepalive, dead peer,
  restart, endpoint names; ``offload`` — segmentation-offload capabilities;
* ``routes`` — interface, routes and MTU; ``reload`` — applying a new config;
  ``control`` — the control socket server; ``status`` — what ``secureioctl`` shows;
* ``device`` — only wires the above together.
"""
