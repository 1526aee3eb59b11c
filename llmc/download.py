"""Fetching a data set's source file over HTTP, for the scripts that turn one into shards
(prepro_tinyshakespeare.py, prepro_tinystories.py, dev/data/hellaswag.py, dev/data/mmlu.py; llm.c keeps the
same helper in dev/data/data_common.py). requests and tqdm are imported on the first download, so a script given a local
copy of its input runs without them."""

import os

import numpy as np

from llmc.utils import write_atomic


def download_file(url, fname, chunk_size=1024):
    """Stream `url` into `fname` with a tqdm bar; the file appears only once it is complete."""
    import requests
    from tqdm import tqdm
    resp = requests.get(url, stream=True, timeout=30)
    resp.raise_for_status()
    total = int(resp.headers.get("content-length", 0))
    with tqdm(desc=fname, total=total, unit="iB", unit_scale=True, unit_divisor=1024) as bar:
        def chunks():
            for data in resp.iter_content(chunk_size=chunk_size):
                bar.update(len(data))
                yield np.frombuffer(data, dtype=np.uint8)
        write_atomic(fname, chunks())


def download(url, fname, offline_command, chunk_size=1024):
    """download_file, or one line saying what failed and how to go on without the network."""
    print(f"downloading {url} to {fname}...")
    import requests
    try:
        download_file(url, fname, chunk_size)
    except requests.RequestException as e:
        raise SystemExit(f"could not download {url} ({type(e).__name__}); put a copy of the file at {fname} "
                         f"or run {offline_command}")


def download_once(url, fname, offline_command):
    """`fname`, downloaded from `url` (download) unless an earlier run left it there; returns fname."""
    if os.path.exists(fname):
        print(f"{fname} already exists, skipping download")
        return fname
    os.makedirs(os.path.dirname(fname) or ".", exist_ok=True)
    download(url, fname, offline_command)
    return fname
