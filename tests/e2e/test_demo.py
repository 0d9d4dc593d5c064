"""`corral demo` prints Python examples; they run as printed."""

import re
import subprocess
import sys
import textwrap

from conftest import CORRAL, free_port, wait_port


def test_demo_python_examples_run_as_printed(tmp_path):
    port, metrics = free_port(), free_port()
    proc = subprocess.Popen(
        [CORRAL, "demo", "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics}",
         "--dir", str(tmp_path), "--token-delay", "1ms"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = []
        for line in proc.stdout:
            banner.append(line)
            if line.startswith("Requests are logged below"):
                break
        wait_port(port, proc)
        text = "".join(banner)
        # Each example is the indented block after "With the ... Python package".
        blocks = re.findall(r"With the \w+ Python package.*?:\n\n((?:  .*\n)+)", text)
        assert len(blocks) == 2, text
        for block in blocks:
            code = textwrap.dedent(block)
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, f"{code}\n{run.stderr}"
            assert run.stdout.startswith("The sky is blue"), run.stdout
    finally:
        proc.terminate()
        proc.wait()
