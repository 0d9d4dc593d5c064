"""`corral demo` prints Python examples; they run as printed."""

import re
import shlex
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

        # The "More keys" command runs as printed and its key works, narrowed to llama3.2.
        more = re.search(r"^More keys: (.*)$", text, re.M).group(1)
        issued = subprocess.run(shlex.split(more), capture_output=True, text=True, timeout=60)
        assert issued.returncode == 0, issued.stderr
        key = issued.stdout.strip()
        ca = re.search(r"--cacert (\S+)", text).group(1)
        base = f"https://localhost:{port}"

        def status(model):
            out = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", ca,
                 "-H", f"Authorization: Bearer {key}", f"{base}/api/show", "-d", f'{{"model":"{model}"}}'],
                capture_output=True, text=True, timeout=60)
            return out.stdout

        assert status("llama3.2") == "200"
        assert status("qwen2.5-coder:7b") == "403"
    finally:
        proc.terminate()
        proc.wait()
