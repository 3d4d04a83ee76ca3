"""README's size figures, measured by .ci/container: checked (they may drift by TOLERANCE before
the check fails) or, with write=1, rewritten. The figures live between the markers below."""

import re
import sys

BEGIN = "<!-- figures: measured by .ci/container, which fails when they drift; `.ci/container --write-figures` rewrites them -->\n"
END = "<!-- /figures -->"
TEMPLATE = (
    "Measured in CI: the release binary built the way the Dockerfile builds it (`cargo build\n"
    "--release --locked --target x86_64-unknown-linux-musl`, static-pie, stripped, LTO) is\n"
    "{binary} bytes, {gzipped} bytes gzipped; the scripts add {scripts} bytes; the image\n"
    "`.ci/container` builds from them (`scratch`, busybox-static, the binary and the scripts) is\n"
    "{image} bytes.\n"
)
TOLERANCE = 0.05


def main(write, readme, pairs):
    measured = dict(pair.split("=", 1) for pair in pairs)
    text = open(readme).read()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        sys.exit(f"{readme}: no figures block ({BEGIN.strip()} ... {END})")
    start += len(BEGIN)
    shown = {k: f"{int(v):,}" for k, v in measured.items()}
    if write == "1":
        open(readme, "w").write(text[:start] + TEMPLATE.format(**shown) + text[end:])
        print(f"figures written to {readme}: {shown}")
        return
    pattern = re.escape(TEMPLATE)
    for key in measured:
        pattern = pattern.replace(re.escape("{" + key + "}"), f"(?P<{key}>[0-9,]+)")
    stated = re.fullmatch(pattern, text[start:end])
    if not stated:
        sys.exit(f"{readme}: the figures block is not in the expected form; run .ci/container --write-figures")
    for key, value in measured.items():
        said = int(stated.group(key).replace(",", ""))
        drift = abs(said - int(value)) / int(value)
        status = "ok" if drift <= TOLERANCE else "DRIFTED"
        print(f"figure {key}: README {said:,}, measured {int(value):,} ({drift:.1%}) {status}")
        if drift > TOLERANCE:
            sys.exit(f"README's {key} figure drifted beyond {TOLERANCE:.0%}: run .ci/container --write-figures")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
