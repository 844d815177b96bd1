"""`rtagger listen` against a fake microphone: a PulseAudio null sink's monitor source.

The fixture starts a private PulseAudio daemon (its own HOME and XDG_RUNTIME_DIR) with a
null sink as the default sink and its monitor as the default source; the test plays a
known signal into the sink with `paplay` while rtagger records from the `pulse` device.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import wave

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("pulseaudio") is None or shutil.which("paplay") is None,
    reason="needs the pulseaudio and pulseaudio-utils packages (bootstrap --dev installs them)",
)
TONE_HZ = 440.0


@pytest.fixture(scope="module")
def pulse_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("pulse-home")
    runtime = tmp_path_factory.mktemp("pulse-run")
    runtime.chmod(0o700)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    env.pop("PULSE_SERVER", None)
    subprocess.run(["pulseaudio", "--daemonize=yes", "--exit-idle-time=-1", "-n",
                    "--load=module-native-protocol-unix",
                    "--load=module-null-sink sink_name=fakemic"],
                   env=env, check=True, capture_output=True, timeout=30)
    try:
        for _ in range(50):
            if subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        subprocess.run(["pactl", "set-default-sink", "fakemic"], env=env, check=True)
        subprocess.run(["pactl", "set-default-source", "fakemic.monitor"], env=env, check=True)
        yield env
    finally:
        subprocess.run(["pulseaudio", "--kill"], env=env, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def tone(tmp_path_factory):
    sr = 44_100
    # Longer than any test needs: the player is killed when the test is done, and a loaded
    # machine may take several seconds to start the listening process.
    t = np.arange(int(sr * 40)) / sr
    x = (0.5 * np.sin(2 * np.pi * TONE_HZ * t) * 32767).astype(np.int16)
    p = tmp_path_factory.mktemp("tone") / "tone.wav"
    with wave.open(str(p), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(x.tobytes())
    return p


RECORD = """
import asyncio, numpy as np
from rtagger.audio.sources import SoundCardSource
async def main():
    card = SoundCardSource("pulse", 16000, 1)
    blocks = [b async for b in card.blocks(3.0)]
    x = np.concatenate(blocks, axis=1)[0][8000:]
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    print(np.fft.rfftfreq(len(x), 1 / 16000)[spec.argmax()], float(np.abs(x).max()),
          card.overruns, card.dropped_blocks)
asyncio.run(main())
"""


def test_sound_card_source_records_what_is_played(pulse_env, tone):
    player = subprocess.Popen(["paplay", str(tone)], env=pulse_env)
    try:
        out = subprocess.run([sys.executable, "-c", RECORD], env=pulse_env, check=True,
                             capture_output=True, text=True, timeout=60).stdout.split()
    finally:
        player.kill()
    peak_hz, amplitude = float(out[0]), float(out[1])
    assert abs(peak_hz - TONE_HZ) < 5 and amplitude > 0.1


def test_listen_command_tags_the_fake_microphone(pulse_env, tone):
    player = subprocess.Popen(["paplay", str(tone)], env=pulse_env)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "rtagger", "listen", "--device", "pulse", "--samplerate",
             "16000", "--seconds", "5", "--jsonl", "--model", "untrained:debug"],
            env=pulse_env, capture_output=True, text=True, timeout=90)
    finally:
        player.kill()
    assert proc.returncode == 0, proc.stderr
    msgs = [json.loads(line) for line in proc.stdout.splitlines()]
    updates = [m for m in msgs if m["type"] == "update"]
    assert len(updates) >= 2 and msgs[-1]["type"] == "final"
    assert msgs[-1]["duration_s"] == pytest.approx(5.0, abs=0.05)
    assert "input overruns:" in proc.stderr  # overruns are always reported
    # the tone got through: its windows are tagged differently from digital silence
    from rtagger.model.checkpoint import build_untrained
    from rtagger.pipeline.tagger import Tagger

    silence = Tagger(build_untrained("debug"), hop_s=1.0).tag_array(np.zeros(16000 * 5,
                                                                             np.float32))
    quiet = dict(zip(silence.tags, silence.windows[0].probs, strict=True))
    full = [u for u in updates if not u["window"]["partial"]]
    assert max(abs(p - quiet[t]) for u in full for t, p in u["window"]["top"]) > 1e-2


def test_listen_lists_devices(pulse_env):
    proc = subprocess.run([sys.executable, "-m", "rtagger", "listen", "--list-devices"],
                          env=pulse_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "pulse" in proc.stdout


def test_unknown_device_is_a_clear_error(pulse_env):
    proc = subprocess.run([sys.executable, "-m", "rtagger", "listen", "--device", "nope-42",
                           "--seconds", "1"], env=pulse_env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "no such input device" in proc.stderr
