"""``extractor_weights="torchvision"`` fetches torchvision's ImageNet file into the torch hub cache on
first use, with torch's own download, tested for real against an HTTP server on 127.0.0.1 (never
the internet): a small file of the right format (a VGG16 state dict up to relu1_2, saved with
torch.save) named as torchvision names its files, ``<arch>-<first 8 hex digits of its SHA-256>.pth``.

Covered: the download and the cache (then no second request); a corrupted file (hash mismatch: a
clear error, nothing left in the cache); a server that refuses the connection or answers 404;
``FASTLOSS_OFFLINE=1`` (no request at all); paths and ``None`` (no request); ``fastloss.info``."""
import functools
import hashlib
import http.server
import io
import os
import socket
import threading
import urllib.request

import pytest
import torch

import fastloss
from fastloss import features
from fastloss.features import VGG

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def vgg16_file_bytes(seed=0):
    """A torchvision-format VGG16 state dict up to relu1_2 (features.0 and features.2), as bytes."""
    torch.manual_seed(seed)
    sd = {f"features.{k}": v for k, v in VGG("vgg16", layers="relu1_2").features.state_dict().items()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue(), sd


def torchvision_name(data, arch="vgg16"):
    """The name torchvision gives a file: ``<arch>-<first 8 hex digits of its SHA-256>.pth``."""
    return f"{arch}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        self.server.seen.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def server(tmp_path):
    """(base URL, the folder it serves, the request paths it saw)."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, httpd.seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The torch hub cache in tmp_path, downloads allowed, no proxy: the checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case something called torch.hub.set_dir
    assert os.path.realpath(torch.hub.get_dir()) == os.path.realpath(tmp_path / "torch-home" / "hub")
    monkeypatch.delenv("FASTLOSS_OFFLINE", raising=False)
    monkeypatch.delenv("FASTLOSS_WEIGHTS_URL", raising=False)
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(urllib.request, "_opener", None)  # a fresh opener, built without proxies
    # every arch points somewhere harmless: a test that forgot to point vgg16 fails, it never goes out
    monkeypatch.setattr(features, "TORCHVISION_URLS", {
        "vgg16": "http://127.0.0.1:9/vgg16-397923af.pth", "vgg19": "http://127.0.0.1:9/vgg19-dcbb9e9d.pth"})
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


LOSSES = {
    "PDLLoss": lambda: fastloss.PDLLoss(layers=("relu1_2",)),
    "D2SMLoss": lambda: fastloss.D2SMLoss(extractor="vgg16", layer="relu1_2", queue_size=8),
    "PerceptualLoss": lambda: fastloss.PerceptualLoss(layers=("relu1_2",)),
    "FDLLoss": lambda: fastloss.FDLLoss(extractor="vgg16", layers=("relu1_2",), num_proj=4),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_download_on_first_use_then_the_cache(name, server, hub, monkeypatch, capfd):
    base, root, seen = server
    data, sd = vgg16_file_bytes()
    fname = torchvision_name(data)
    (root / fname).write_bytes(data)
    monkeypatch.setitem(features.TORCHVISION_URLS, "vgg16", f"{base}/{fname}")

    loss = LOSSES[name]()  # extractor_weights="torchvision", the default
    assert seen == [f"/{fname}"]
    assert _files(hub) == [fname] and (hub / fname).read_bytes() == data
    vgg = loss.vgg if name == "PerceptualLoss" else loss.extractor
    for k, v in vgg.features.state_dict().items():
        assert torch.equal(v, sd[f"features.{k}"]), k
    err = capfd.readouterr().err
    assert f"{base}/{fname}" in err and str(hub / fname) in err  # says what it fetches, and where to
    u = torch.rand(2, 3, 16, 16, requires_grad=True)
    loss(u, torch.rand(2, 3, 16, 16)).backward()
    assert torch.isfinite(u.grad).all()

    LOSSES[name]()  # the second build reads the cache: no second request
    assert seen == [f"/{fname}"]
    # offline with the file cached: fine, and still no request
    monkeypatch.setenv("FASTLOSS_OFFLINE", "1")
    LOSSES[name]()
    assert seen == [f"/{fname}"]


def test_a_corrupted_file_is_refused_and_not_kept(server, hub, monkeypatch):
    """The server's file does not hash to the prefix its name carries (served under torchvision's
    real name through FASTLOSS_WEIGHTS_URL, a mirror): a clear error, and nothing in the cache."""
    base, root, seen = server
    data, _ = vgg16_file_bytes()
    (root / "vgg16-397923af.pth").write_bytes(data)
    monkeypatch.setitem(features.TORCHVISION_URLS, "vgg16", "https://download.pytorch.org/models/vgg16-397923af.pth")
    monkeypatch.setenv("FASTLOSS_WEIGHTS_URL", base + "/")
    assert features.torchvision_weights("vgg16")["url"] == f"{base}/vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError) as e:
        fastloss.PDLLoss(layers=("relu1_2",))
    msg = str(e.value)
    assert seen == ["/vgg16-397923af.pth"]
    assert msg.startswith("PDLLoss: extractor_weights='torchvision'")
    assert "SHA-256" in msg and "'397923af'" in msg and hashlib.sha256(data).hexdigest() in msg
    assert "not kept" in msg and f"{base}/vgg16-397923af.pth" in msg
    assert "extractor_weights='/path/to/vgg16-397923af.pth'" in msg and "extractor_weights=None" in msg
    assert _files(hub) == []  # neither the file nor a .partial


def test_a_truncated_download_under_its_own_name_is_refused(server, hub, monkeypatch):
    """Named after the whole file, served cut short: the hash of what arrived does not match."""
    base, root, seen = server
    data, _ = vgg16_file_bytes()
    fname = torchvision_name(data)
    (root / fname).write_bytes(data[: len(data) // 2])
    monkeypatch.setitem(features.TORCHVISION_URLS, "vgg16", f"{base}/{fname}")
    with pytest.raises(FileNotFoundError, match="SHA-256 does not start with"):
        fastloss.PerceptualLoss(layers=("relu1_2",))
    assert seen == [f"/{fname}"] and _files(hub) == []


def test_a_server_that_refuses(hub, monkeypatch):
    url = f"http://127.0.0.1:{_free_port()}/vgg16-397923af.pth"
    monkeypatch.setitem(features.TORCHVISION_URLS, "vgg16", url)
    with pytest.raises(FileNotFoundError) as e:
        fastloss.D2SMLoss(extractor="vgg16", layer="relu1_2")
    msg = str(e.value)
    assert msg.startswith("D2SMLoss: extractor_weights='torchvision'")
    assert f"downloading them from {url} failed: URLError" in msg and "refused" in msg.lower()
    assert f"put the file at {hub / 'vgg16-397923af.pth'}" in msg
    assert "extractor_weights=None" in msg
    assert isinstance(e.value.__cause__, OSError)
    assert _files(hub) == []


def test_a_server_without_the_file(server, hub, monkeypatch):
    base, _, seen = server
    monkeypatch.setitem(features.TORCHVISION_URLS, "vgg16", f"{base}/vgg16-397923af.pth")
    with pytest.raises(FileNotFoundError) as e:
        VGG("vgg16", layers="relu1_2", weights="torchvision")
    msg = str(e.value)
    assert seen == ["/vgg16-397923af.pth"]
    assert msg.startswith("VGG: weights='torchvision'")  # VGG's own keyword when built directly
    assert "HTTPError: HTTP Error 404" in msg and "weights=None" in msg
    assert _files(hub) == []


def test_offline_never_makes_a_request(server, hub, monkeypatch):
    base, root, seen = server
    data, _ = vgg16_file_bytes()
    fname = torchvision_name(data)
    (root / fname).write_bytes(data)  # it would succeed if asked
    monkeypatch.setitem(features.TORCHVISION_URLS, "vgg16", f"{base}/{fname}")
    monkeypatch.setenv("FASTLOSS_OFFLINE", "1")
    for build in LOSSES.values():
        with pytest.raises(FileNotFoundError) as e:
            build()
        msg = str(e.value)
        assert "extractor_weights='torchvision'" in msg and "FASTLOSS_OFFLINE=1 forbids downloading" in msg
        # both ways out: the download (or the file put in place), or another value of the keyword
        assert f"unset FASTLOSS_OFFLINE" in msg and f"put the file at {hub / fname}" in msg
        assert f"extractor_weights='/path/to/{fname}'" in msg and "extractor_weights=None" in msg
        assert "weights=" not in msg.replace("extractor_weights=", "")  # never the VGG keyword
    assert seen == []
    assert not os.path.exists(hub)  # nothing created either


def test_paths_and_none_never_touch_the_network(server, hub, monkeypatch, tmp_path):
    base, root, seen = server
    data, sd = vgg16_file_bytes(seed=3)
    fname = torchvision_name(data)
    (root / fname).write_bytes(data)
    monkeypatch.setitem(features.TORCHVISION_URLS, "vgg16", f"{base}/{fname}")
    local = tmp_path / "mine.pth"
    local.write_bytes(data)
    fastloss.PDLLoss(layers=("relu1_2",), extractor_weights=None)
    loss = fastloss.PDLLoss(layers=("relu1_2",), extractor_weights=str(local))
    assert torch.equal(loss.extractor.features[0].weight, sd["features.0.weight"])
    fastloss.PerceptualLoss(layers=("relu1_2",), extractor_weights=local)
    with pytest.raises(FileNotFoundError, match="PDLLoss: weights file not found: extractor_weights="):
        fastloss.PDLLoss(layers=("relu1_2",), extractor_weights=str(tmp_path / "nope.pth"))
    assert seen == [] and not os.path.exists(hub)


def test_info_names_where_the_weights_come_from(server, hub, monkeypatch):
    from fastloss import info

    base, root, _ = server
    data, _ = vgg16_file_bytes()
    fname = torchvision_name(data)
    (root / fname).write_bytes(data)
    monkeypatch.setitem(features.TORCHVISION_URLS, "vgg16", f"{base}/{fname}")
    text = "\n".join(info.weights_report())
    assert f"{hub / fname} (missing: downloaded on first use) <- {base}/{fname}" in text
    assert str(hub / "vgg19-dcbb9e9d.pth") in text and "mdf" in text
    fastloss.PDLLoss(layers=("relu1_2",))
    monkeypatch.setenv("FASTLOSS_OFFLINE", "1")
    text = "\n".join(info.weights_report())
    assert f"{hub / fname} (present)" in text
    assert "FASTLOSS_OFFLINE is set" in text and "vgg19-dcbb9e9d.pth (missing, offline" in text
    assert "extractor weights" in "\n".join(info.report())
