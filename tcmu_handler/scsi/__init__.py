"""SCSI emulation for a thin-provisioned disk (sans-I/O)."""
