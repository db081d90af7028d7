"""Passerelle: an SMTP gateway between secure health-messaging networks."""

__version__ = "0.1.0"
