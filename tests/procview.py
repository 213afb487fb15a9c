"""Read-only views of processes and listening TCP sockets from /proc (cluster and services tests; Linux only)."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

LISTEN = "0A"  # TCP state code of a listening socket in /proc/net/tcp{,6}


def state(pid: int) -> str | None:
    """The process state letter (R, S, Z, ...), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (PID 1 may never reap a killed daemon here)."""
    return state(pid) not in (None, "Z", "X")


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def tree(pids: set[int]) -> set[int]:
    """The given PIDs and all their living descendants."""
    parents = {p: parent(p) for p in all_pids()}
    found, grew = set(pids), True
    while grew:
        new = {p for p, pp in parents.items() if pp in found and p not in found}
        found |= new
        grew = bool(new)
    return {p for p in found if alive(p)}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k: v for k, v in pairs}


def with_env(key: str, value: str) -> set[int]:
    """Living processes whose environment holds key=value (what every process of one test cluster inherits)."""
    return {p for p in all_pids() if environ(p).get(key) == value and alive(p)}


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    # The kernel prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def listening_sockets() -> dict[int, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """Socket inode -> (address, port) of every listening TCP socket, IPv4 and IPv6."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) > 9 and cols[3] == LISTEN:
                addr, port = cols[1].split(":")
                found[int(cols[9])] = (_address(addr), int(port, 16))
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listeners(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket that the processes (and their descendants) listen on."""
    table = listening_sockets()
    return {(str(table[i][0]), table[i][1]) for p in tree(pids) for i in socket_inodes(p) if i in table}


def loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def conf_value(path: Path, key: str) -> str:
    """The value of `Key=value` in a Slurm config file (first match; KeyError when absent)."""
    for line in path.read_text().splitlines():
        if line.split("=", 1)[0].strip() == key and "=" in line:
            return line.split("=", 1)[1].strip()
    raise KeyError(f"{path}: no {key}")
