"""What TCP adds to moving a message over a shaped link: headers, and slow start on a cold connection.

A connection's window starts at ``INIT_CWND`` segments (RFC 6928) when it is new, and again when it has
been idle for longer than its retransmission timeout (Linux's ``tcp_slow_start_after_idle``, on by
default): each round trip then sends a window, doubling, until the window covers the bandwidth-delay
product; the rest goes at the link's payload rate.  Applications' analytic models use it: cache
delivery (a fetch on an idle connection) and pipeline training (each wave's first message on a link
that rested through the rest of the step).
"""

from __future__ import annotations

import math

MTU = 1500  # bytes of an IP packet on the emulated links (what their rates count)
MSS = 1448  # TCP payload per packet: 1500 - 20 (IP) - 20 (TCP) - 12 (timestamps option)
INIT_CWND = 10  # TCP's initial (and after-idle restart) window, in segments (RFC 6928)
MATHIS_C = math.sqrt(1.5)  # Mathis et al. (1997): a window halved at each of random losses


def payload_rate(rate_mbit: float) -> float:
    """Payload bytes per second of a link whose rate counts whole IP packets."""
    return rate_mbit * 1e6 / 8 * MSS / MTU


def transfer_s(nbytes: float, rate_mbit: float, rtt_ms: float, init_cwnd: int = INIT_CWND) -> float:
    """Seconds from sending a request to the last of ``nbytes`` of reply: one round trip, then slow start
    from ``init_cwnd`` segments (each round a window, doubling, one RTT apart) until the window covers
    the bandwidth-delay product; the rest at the payload rate."""
    rate = payload_rate(rate_mbit)
    rtt = rtt_ms / 1e3
    bdp = rate * rtt
    t, left, window = rtt, float(nbytes), float(init_cwnd * MSS)
    while window < bdp and left > window:
        left -= window
        window *= 2
        t += rtt
    return t + left / rate


def slow_start_s(nbytes: float, rate_mbit: float, rtt_ms: float, init_cwnd: int = INIT_CWND) -> float:
    """Seconds slow start adds to sending ``nbytes`` on a cold connection, beyond sending them at the
    payload rate from the first byte (0 on a link without delay: the window opens at once)."""
    if nbytes <= 0 or rtt_ms <= 0 or rate_mbit <= 0 or rate_mbit == float("inf"):
        return 0.0
    warm = rtt_ms / 1e3 + nbytes / payload_rate(rate_mbit)
    return max(0.0, transfer_s(nbytes, rate_mbit, rtt_ms, init_cwnd) - warm)


def loss_limited_mbit(loss_pct: float, rtt_ms: float) -> float | None:
    """The rate, counting whole IP packets as link rates do, that one TCP flow settles at on a path
    losing ``loss_pct`` of its packets at random: ``MSS / RTT * C / sqrt(p)`` of payload (Mathis et
    al.); None without loss or without a round trip (nothing then bounds it but the links)."""
    if loss_pct <= 0 or rtt_ms <= 0:
        return None
    goodput = MSS / (rtt_ms / 1e3) * MATHIS_C / math.sqrt(loss_pct / 100)  # payload bytes/s
    return goodput * 8 / 1e6 * MTU / MSS
