"""targetvirt: virtual disks as segment mapping tables, served to the Linux LIO target."""

__version__ = "0.1.0"
