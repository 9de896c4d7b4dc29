"""What a new user reads when the server starts: `blip2-serve --gallery-dir NEW` as `make serve` runs it, in
its own process, with a gallery created on the way. Its whole output, start to shutdown, holds log lines and
nothing that reads as trouble (no third-party tracebacks, load failures, deprecations or progress bars)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import easy_vqa
import httpx
from servertools import WAIT_S, start_process

SERVE = Path(sys.executable).parent / "blip2-serve"


def test_server_start_with_a_new_gallery_prints_no_alarm(tmp_path, alarming_lines):
    image = Path(easy_vqa.get_test_image_paths()[0]).read_bytes()  # a red triangle
    process, url = start_process(["--gallery-dir", str(tmp_path / "gallery")], entry=[str(SERVE)])
    try:
        with httpx.Client(base_url=url, timeout=WAIT_S) as client:
            answer = client.post(
                "/vqa", files={"image": image}, data={"question": "what color is the shape?"}
            )
            added = client.post("/gallery/images", files={"images": ("red.png", image)})
            found = client.post("/gallery/search", json={"text": "a red triangle"})
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=WAIT_S)[0]
    assert answer.status_code == 200 and answer.json()["answer"] == "red", answer.text
    assert added.status_code == 200 and found.status_code == 200, (added.text, found.text)
    assert process.returncode == 0, output
    assert "gallery: 0 images (lancedb)" in output and "INFO service.app ready" in output, output
    assert alarming_lines(output) == [], output
