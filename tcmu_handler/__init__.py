"""The TCMU data path: kernel ABI, ring, SCSI emulation, per-device command loop."""
