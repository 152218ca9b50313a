"""Steering WireGuard datagrams to the data-plane worker that holds their session.

Several workers may each own a UDP socket bound to the same port with SO_REUSEPORT. By
default the kernel picks one by a hash of the 4-tuple, which knows nothing of sessions. A
classic BPF program attached to the group (SO_ATTACH_REUSEPORT_CBPF) picks instead, by the
receiver index the datagram carries: a worker hands out only receiver indexes whose low byte,
taken modulo the number of workers, is its own number (`index_for_worker`), so every
transport datagram, handshake response and cookie reply lands on the worker that made the
index. An initiation carries no index of ours; the program answers "no choice" (a number
beyond the group) and the kernel falls back to its hash.

The program sees the UDP payload from offset 0 (the kernel pulls the UDP header first). The
receiver index sits at offset 4 in transport data and cookie replies, at offset 8 in
responses; it is little-endian, so its low byte is the first byte of the field. A datagram
too short for the load makes a classic BPF program return 0: the first worker, which drops
it as malformed, as it would any other.
"""

from __future__ import annotations

import ctypes
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51

# struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }
_INSN = struct.Struct("HBBI")
BPF_LD_B_ABS = 0x30  # A = byte at packet[k]
BPF_ALU_MOD_K = 0x94  # A %= k
BPF_JEQ_K = 0x15  # if A == k goto +jt else goto +jf
BPF_RET_A = 0x16
BPF_RET_K = 0x06

MAX_WORKERS = 256  # the low byte of the index names the worker
NO_CHOICE = 0xFFFFFFFF  # a number beyond any group: the kernel picks by hash


def program(workers: int) -> list[tuple[int, int, int, int]]:
    """The instructions (code, jt, jf, k): worker = receiver index's low byte % workers."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be 1..{MAX_WORKERS}, not {workers}")
    return [
        (BPF_LD_B_ABS, 0, 0, 0),         # 0: A = message type
        (BPF_JEQ_K, 3, 0, 4),            # 1: transport data -> 5
        (BPF_JEQ_K, 2, 0, 3),            # 2: cookie reply -> 5
        (BPF_JEQ_K, 4, 0, 2),            # 3: response -> 8
        (BPF_RET_K, 0, 0, NO_CHOICE),    # 4: an initiation or junk: the kernel's hash
        (BPF_LD_B_ABS, 0, 0, 4),         # 5: A = low byte of the receiver index at 4
        (BPF_ALU_MOD_K, 0, 0, workers),  # 6
        (BPF_RET_A, 0, 0, 0),            # 7
        (BPF_LD_B_ABS, 0, 0, 8),         # 8: A = low byte of the receiver index at 8
        (BPF_ALU_MOD_K, 0, 0, workers),  # 9
        (BPF_RET_A, 0, 0, 0),            # 10
    ]


def attach(sock: socket.socket, workers: int) -> None:
    """Attach program(workers) to the SO_REUSEPORT group of `sock` (any member will do).

    The group's members are numbered in the order they were bound: bind worker 0's socket
    first. Raises OSError when the kernel refuses (no SO_REUSEPORT on `sock`, say).
    """
    code = b"".join(_INSN.pack(*insn) for insn in program(workers))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }: the kernel
    # copies the instructions during the call, so the buffer only has to outlive it.
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(code) // _INSN.size, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def index_for_worker(raw: int, worker: int, workers: int) -> int:
    """A receiver index from 32 random bits `raw`, changed so that program(workers) steers
    it to `worker`: its low byte becomes worker + workers * k for the k that `raw` picks."""
    if not 0 <= worker < workers <= MAX_WORKERS:
        raise ValueError(f"worker {worker} of {workers}")
    slots = (256 - worker + workers - 1) // workers  # low bytes 0..255 that name `worker`
    low = worker + workers * ((raw & 0xFF) % slots)
    return (raw & ~0xFF & 0xFFFFFFFF) | low


def owner_of(public_key: bytes, workers: int) -> int:
    """The worker that owns the peer with this public key: it alone holds the peer's sessions,
    timers and replay state. Keys are uniformly random, so their first bytes spread the peers
    evenly; the same key names the same worker in every process."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be 1..{MAX_WORKERS}, not {workers}")
    return int.from_bytes(public_key[:8], "little") % workers
