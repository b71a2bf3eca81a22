"""Shared foundation: errors, types, config, bundle manifest, policy interface, wire protocol.

Imports nothing else from tether.
"""
