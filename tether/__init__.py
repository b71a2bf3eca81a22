"""tether: split computing and cloud-edge offloading for DNNs and LLMs."""

__version__ = "0.1.0"
