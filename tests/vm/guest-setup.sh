#!/bin/sh
# One-time setup of the real-stack test guest, run by the harness (tests/vm/guest.py)
# right after the agent is up. Idempotent. Everything it changes lives in the guest only:
# virtme-ng gives the guest tmpfs overlays over /etc, /usr, /var and a tmpfs /run; the
# rest of the host filesystem is read-only.
set -eu

step() { printf '== %s (uptime %s)\n' "$*" "$(cut -d' ' -f1 /proc/uptime)"; }

step modules
# configfs may be built in; the rest are modules in Debian's 6.1 kernel.
modprobe configfs 2>/dev/null || true
for m in target_core_mod target_core_file target_core_iblock target_core_user tcm_loop \
  iscsi_target_mod uio sd_mod sg iscsi_tcp; do
  modprobe "$m"
done
# Optional: only present on some kernels, only needed by multipath tests.
modprobe dm_multipath 2>/dev/null || echo "note: dm_multipath not available"

step configfs
if ! mountpoint -q /sys/kernel/config; then
  mount -t configfs none /sys/kernel/config
fi
test -d /sys/kernel/config/target || { echo "configfs: no target/ folder" >&2; exit 1; }
# rtslib-fb sets target/dbroot (where LIO keeps APTPL persistent-reservation and ALUA
# metadata) to /etc/target only when an RTSRoot() is made before the first storage object;
# creating a storage object directly leaves the kernel default /var/target, which does not
# exist, and every PROUT with APTPL then fails with NOT READY 08h/00h. The kernel accepts
# a new dbroot only while no device exists and only if the folder exists.
mkdir -p /etc/target/pr /etc/target/alua
if [ "$(cat /sys/kernel/config/target/dbroot)" != /etc/target ]; then
  echo /etc/target >/sys/kernel/config/target/dbroot
fi

step network
ip link set lo up

step scratch
# Writable, fast scratch space for backing files. /mnt and /root are read-only.
mkdir -p /run/ram
mountpoint -q /run/ram || mount -t tmpfs -o "size=${TARGETVIRT_VM_RAM_SIZE:-75%}" tmpfs /run/ram
mkdir -p /run/home/.targetcli /run/lock /var/log

step dbus
# tcmu-runner installs a D-Bus activation file for org.kernel.TCMUService1; without
# systemd the system bus would start tcmu-runner by itself as soon as targetcli (or
# anything) asks for that name. Tests start tcmu-runner explicitly when they want it,
# so switch activation off (the file lives in the guest's /usr overlay only).
rm -f /usr/share/dbus-1/system-services/org.kernel.TCMUService1.service
mkdir -p /run/dbus
if [ ! -S /run/dbus/system_bus_socket ]; then
  rm -f /run/dbus/pid
  dbus-daemon --system --fork
fi

step iscsi
# The guest's /etc and /var are tmpfs overlays; if a virtme-ng without them is used,
# fall back to tmpfs copies bind-mounted over the read-only originals.
if ! touch /etc/iscsi/.w 2>/dev/null; then
  mkdir -p /run/iscsi-etc
  cp -a /etc/iscsi/. /run/iscsi-etc/
  mount --bind /run/iscsi-etc /etc/iscsi
fi
rm -f /etc/iscsi/.w
if ! mkdir -p /var/lib/iscsi 2>/dev/null || ! touch /var/lib/iscsi/.w 2>/dev/null; then
  mkdir -p /run/iscsi-var
  mount --bind /run/iscsi-var /var/lib/iscsi
fi
rm -f /var/lib/iscsi/.w
# A fixed initiator name, whatever the host's (possibly missing) file says.
echo "InitiatorName=iqn.2026-11.org.example:guest-initiator" >/etc/iscsi/initiatorname.iscsi
if ! pgrep -x iscsid >/dev/null; then
  iscsid
fi

step done
