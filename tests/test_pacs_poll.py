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
