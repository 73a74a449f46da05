#!/usr/bin/env bash
# Installs a Slurm controller, node daemon, client tools and munge from the distribution's
# packages (Debian/Ubuntu; needs root and apt-get). Does nothing when they are already installed.
# Used by the local test harness (slurm/local/up.sh, tests/slurm/); not needed on a real cluster.
set -euo pipefail

bins=(/usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/bin/srun /usr/bin/scontrol
      /usr/sbin/munged /usr/bin/munge /usr/sbin/mungekey)
missing=()
for b in "${bins[@]}"; do [ -x "$b" ] || missing+=("$b"); done
[ ${#missing[@]} -eq 0 ] && { echo "slurm/local/install.sh: Slurm and munge already installed"; exit 0; }

if [ "$(id -u)" != 0 ]; then
    echo "slurm/local/install.sh: ERROR: missing ${missing[*]}; installing them needs root (apt-get)" >&2
    exit 3
fi
if ! command -v apt-get >/dev/null; then
    echo "slurm/local/install.sh: ERROR: missing ${missing[*]} and apt-get is not available;" \
         "install slurmctld, slurmd, slurm-client and munge with this system's package manager" >&2
    exit 4
fi
export DEBIAN_FRONTEND=noninteractive
# The packages' maintainer scripts try to start services; without systemd that is a no-op and the
# harness starts the daemons itself.
apt-get update -q || { echo "slurm/local/install.sh: ERROR: apt-get update failed" >&2; exit 5; }
apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge \
    || { echo "slurm/local/install.sh: ERROR: apt-get install of slurmctld slurmd slurm-client munge failed" >&2; exit 5; }
for b in "${bins[@]}"; do
    [ -x "$b" ] || { echo "slurm/local/install.sh: ERROR: $b still missing after apt-get install" >&2; exit 5; }
done
echo "slurm/local/install.sh: installed $(/usr/sbin/slurmd -V) and munge $(/usr/sbin/munged -V 2>&1 | head -1)"
