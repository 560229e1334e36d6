"""`cxrtune pacs poll`'s credentials (issue 22, item 6): a bearer token or HTTP Basic (Orthanc's
own users), from the environment or owner-only files, never from a flag; a private CA's bundle.
The polling itself runs against Orthanc in tests/test_pacs_orthanc.py."""

import pytest

from cxrtune.errors import CxrtuneError
from cxrtune.pacs.poll import BASIC_FILE_ENV, CA_BUNDLE_ENV, TOKEN_ENV, TOKEN_FILE_ENV, dicomweb_session


@pytest.fixture
def clean_env(monkeypatch):
    for name in (TOKEN_ENV, TOKEN_FILE_ENV, BASIC_FILE_ENV, CA_BUNDLE_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def secret(tmp_path, name: str, text: str, mode: int = 0o600):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_no_credentials_sends_none(clean_env):
    session = dicomweb_session()
    assert "Authorization" not in session.headers and session.auth is None and session.verify is True


def test_a_token_from_the_environment_or_an_owner_only_file(clean_env, tmp_path):
    clean_env.setenv(TOKEN_ENV, "tok-env")
    assert dicomweb_session().headers["Authorization"] == "Bearer tok-env"
    clean_env.delenv(TOKEN_ENV)
    clean_env.setenv(TOKEN_FILE_ENV, secret(tmp_path, "token", "tok-file\n"))
    assert dicomweb_session().headers["Authorization"] == "Bearer tok-file"
    clean_env.setenv(TOKEN_FILE_ENV, secret(tmp_path, "open-token", "tok-leaked", 0o644))
    with pytest.raises(CxrtuneError) as refused:
        dicomweb_session()
    assert "tok-leaked" not in str(refused.value)


def test_basic_credentials_from_an_owner_only_file_and_a_private_ca(clean_env, tmp_path):
    clean_env.setenv(BASIC_FILE_ENV, secret(tmp_path, "basic", "cxrtune:pa:ss\n"))
    clean_env.setenv(CA_BUNDLE_ENV, "/etc/ssl/hospital-ca.pem")
    session = dicomweb_session()
    assert session.auth == ("cxrtune", "pa:ss") and session.verify == "/etc/ssl/hospital-ca.pem"
    clean_env.setenv(BASIC_FILE_ENV, secret(tmp_path, "no-colon", "justapassword"))
    with pytest.raises(CxrtuneError, match="USER:PASSWORD") as refused:
        dicomweb_session()
    assert "justapassword" not in str(refused.value)
    clean_env.setenv(BASIC_FILE_ENV, secret(tmp_path, "basic2", "cxrtune:secret"))
    clean_env.setenv(TOKEN_ENV, "tok")
    with pytest.raises(CxrtuneError, match="not both"):
        dicomweb_session()


def test_a_body_cut_off_is_tried_again_and_a_server_that_ignores_offsets_is_named(tmp_path, caplog):
    """A real HTTP server on 127.0.0.1 that cuts its first QIDO-RS answer off mid-body (tried again
    within the poll, as a connection error is) and then answers every page with the same
    instances, whatever the offset (the poller stops and says why, rather than starving quietly)."""
    import datetime as dt
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cxrtune.pacs.poll import DicomwebPoller, PollSettings, PollState
    from cxrtune.pacs.spool import Spool

    instances = [{tag: {"vr": "UI", "Value": [f"1.2.826.0.1.{i}.{n}"]} for n, tag in enumerate(
        ("0020000D", "0020000E", "00080018"))} for i in range(3)]
    body, asked = json.dumps(instances).encode(), []

    class IgnoresOffsets(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            if len(asked) == 1:  # a chunk that never ends: the connection drops mid-body
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n" % len(body) + body[:10])
                self.close_connection = True
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), IgnoresOffsets)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        poller = DicomwebPoller(PollSettings(url=f"http://127.0.0.1:{server.server_port}", page_size=3, backoff_s=0.01,
                                             modalities=("CR",)), Spool(tmp_path / "spool"), scorer=None,
                                study_key=b"k" * 32)
        with caplog.at_level("WARNING", logger="cxrtune"):
            found = poller.new_instances(PollState(), dt.date.today())
    finally:
        server.shutdown()
    assert sorted(uids[2] for uids in found) == [f"1.2.826.0.1.{i}.2" for i in range(3)]
    assert len(asked) == 3 and "offset=3" in asked[2]
    assert "seems to ignore QIDO-RS offsets" in caplog.text
