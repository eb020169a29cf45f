"""Where the resident memory of a GPTQ run on SmolLM2 goes before GPTQ starts: resident,
anonymous and file-mapped memory (from /proc/self/status, Linux) after importing torch,
transformers and sculpt, after loading the packaged SmolLM2, and after tokenizing 2 MB of
Shakespeare (framework.data.tokenize encodes long texts in pieces and returns the freed
heap to the OS itself; the last line is one more explicit
framework.heap.release_freed_memory call). VmHWM is the process's peak so far: after the
tokenizing line it shows what encoding the text cost on top of the loaded model.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/memory_floor.py
"""

from __future__ import annotations


def status_mib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) // 1024
    return out


def main() -> None:
    print("start", status_mib())
    from framework.data import tokenize
    from framework.data.sources import shakespeare
    from framework.heap import release_freed_memory
    from framework.models import load_packaged

    print("torch, transformers, sculpt imported", status_mib())
    loaded = load_packaged("smollm2-135m-instruct")
    print("SmolLM2 loaded", status_mib())
    ids = tokenize(loaded.tokenizer, shakespeare()[:2_000_000])
    print(f"{ids.numel():,} tokens of Shakespeare", status_mib())
    release_freed_memory()
    print("freed heap returned again", status_mib())


if __name__ == "__main__":
    main()
