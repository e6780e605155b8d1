"""The edge store's writer thread against a real SIGKILL: a process takes readings as fast as it
can, says which ones counted (their futures are done), and is killed; what it said is on disk."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from edge.store import EdgeStore

_TAKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from edge.config import Gateway, Machine
    from edge.normalize import Normalizer, Reading
    from edge.store import EdgeStore

    gateway = Gateway(id="gw-1", tenant="acme", site="plant-1")
    press = Machine.model_validate(
        {"id": "press-01", "type": "hydraulic_press", "adapter": {"kind": "modbus_tcp", "host": "plc"}}
    )
    normalizer = Normalizer(gateway, press)
    batch_ms = None if sys.argv[2] == "always" else int(sys.argv[2])
    store = EdgeStore(Path(sys.argv[1]), gateway="gw-1", batch_ms=batch_ms)

    def counted(done):
        for row in done.result():
            sys.stdout.write(f"{row.key[1]}\\n")
        sys.stdout.flush()

    while True:
        reading = normalizer.normalize(Reading(time.time(), "running", {"pressure_bar": 210.0}))
        store.submit([reading]).add_done_callback(counted)
        time.sleep(0.0002)
    """
)


def _kill_while_taking(path: Path, policy: str, counted: int) -> list[int]:
    """Run the taker until it reported ``counted`` readings, SIGKILL it: the seqs it reported."""
    taker = subprocess.Popen(
        [sys.executable, "-c", _TAKER, str(path), policy], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert taker.stdout is not None
    reported: list[int] = []
    deadline = time.monotonic() + 60
    while len(reported) < counted and time.monotonic() < deadline:
        line = taker.stdout.readline()
        if not line:
            break
        reported.append(int(line))
    taker.send_signal(signal.SIGKILL)
    rest, errors = taker.communicate(timeout=20)
    reported += [int(line) for line in rest.split()]  # reported before the kill landed
    assert len(reported) >= counted, errors.decode()[-2000:]
    return reported


def test_a_reading_that_counted_under_the_default_policy_survives_a_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    reported = _kill_while_taking(path, "always", 3000)
    store = EdgeStore(path, gateway="gw-1")
    kept = {row.key for row in store.history("press-01", (-1, -1), (store.boot, 0), 1_000_000)}
    store.close()
    assert store.boot == 1
    missing = {(0, n) for n in reported} - kept
    assert not missing, f"{len(missing)} readings that counted were lost, e.g. {sorted(missing)[:5]}"
    # The writer commits in order: what is on disk is every seq from 0 up to the last one, no hole.
    assert kept == {(0, n) for n in range(len(kept))}


def test_a_batch_policy_commits_in_order_so_a_sigkill_leaves_a_prefix(tmp_path: Path) -> None:
    """``batch:<ms>`` counts a reading before its commit (the open window may be lost): what
    survives is a hole-free prefix of what counted."""
    path = tmp_path / "store.db"
    reported = _kill_while_taking(path, "50", 3000)
    store = EdgeStore(path, gateway="gw-1", batch_ms=50)
    kept = {row.key for row in store.history("press-01", (-1, -1), (store.boot, 0), 1_000_000)}
    store.close()
    assert kept == {(0, n) for n in range(len(kept))}
    # A transaction commits 50 ms after it began; 3,000 readings took longer than that.
    assert kept, "nothing was committed"
    assert len(kept) <= len(reported), "only readings that counted can have been committed"
