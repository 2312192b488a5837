"""What a program inside a container reads of its cgroup limits, runc's way or pysandbox's.

:data:`READER` is a busybox shell script that finds the container's cgroup the way the JVM,
Go's automaxprocs and libuv do — its path per hierarchy from ``/proc/self/cgroup``, where that
hierarchy is mounted and at which root from ``/proc/self/mountinfo``: the files are at mount
point + (path - root) — then prints one ``key value`` line per limit, from the cgroup v1 files
when the memory controller is on a v1 hierarchy, else from cgroup v2. It also prints
``direct``: what the issue's one-liner ``cat /sys/fs/cgroup/memory/memory.limit_in_bytes ||
cat /sys/fs/cgroup/memory.max`` gives. :func:`parse` turns the output into a dict.
"""

from __future__ import annotations

READER = r"""
dir() {
  awk -v c="$1" '
    FNR == NR { split($0, f, ":"); n = split(f[2], cs, ",")
                if (c == "" && f[1] == "0") p = f[3]
                for (i = 1; i <= n; i++) if (cs[i] == c) p = f[3]
                next }
    { for (s = 1; s <= NF; s++) if ($s == "-") break
      if (c == "" && $(s + 1) == "cgroup2") { r = $4; m = $5 }
      if (c != "" && $(s + 1) == "cgroup") {
        n = split($(s + 3), o, ","); for (i = 1; i <= n; i++) if (o[i] == c) { r = $4; m = $5 } } }
    END { if (m == "") exit 1
          if (r != "/" && index(p, r) == 1) p = substr(p, length(r) + 1)
          print m p }' /proc/self/cgroup /proc/self/mountinfo
}
if d=$(dir memory) && [ -e "$d/memory.limit_in_bytes" ]; then
  echo version v1
  echo memory $(cat "$d/memory.limit_in_bytes")
  echo pids $(cat "$(dir pids)/pids.max")
  c=$(dir cpu); echo quota $(cat "$c/cpu.cfs_quota_us"); echo period $(cat "$c/cpu.cfs_period_us")
  echo shares $(cat "$c/cpu.shares")
  s=$(dir cpuset); echo cpus $(cat "$s/cpuset.cpus"); echo mems $(cat "$s/cpuset.effective_mems")
else
  d=$(dir "") || { echo no cgroup found; exit 1; }
  echo version v2
  echo memory $(cat "$d/memory.max")
  echo pids $(cat "$d/pids.max")
  set -- $(cat "$d/cpu.max"); echo quota $1; echo period $2
  echo weight $(cat "$d/cpu.weight")
  echo cpus $(cat "$d/cpuset.cpus"); echo mems $(cat "$d/cpuset.mems.effective")
fi
echo direct $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null ||
              cat /sys/fs/cgroup/memory.max)
"""


def parse(output: str) -> dict[str, str]:
    """``key value`` lines -> dict (a key with no value maps to "")."""
    values = {}
    for line in output.splitlines():
        key, _, value = line.partition(" ")
        values[key] = value.strip()
    assert "version" in values, output
    return values


def runc_weight(shares: int) -> int:
    """runc's cgroup v2 cpu.weight for a cpu.shares value (libcontainer/cgroups/utils.go)."""
    return 1 + ((shares - 2) * 9999) // 262142


def as_runc_v1(values: dict[str, str]) -> dict[str, str]:
    """A v2 reading in the terms runc shows on a cgroup v1 host: "max" is v1's -1 for the
    quota, and the weight is compared as the shares it was converted from, by the caller."""
    if values["version"] == "v1":
        return dict(values)
    converted = {k: v for k, v in values.items() if k not in ("version", "weight")}
    if converted["quota"] == "max":
        converted["quota"] = "-1"
    return converted
