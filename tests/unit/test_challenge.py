import json

import pytest

from imagefs.errors import RegistryError, Unauthorized
from imagefs.registry.challenge import (
    Challenge,
    Token,
    parse_challenges,
    parse_token_response,
    scope_for,
    token_request_params,
)


def test_docker_hub_bearer_challenge() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    [ch] = parse_challenges(header)
    assert ch.scheme == "bearer"
    assert dict(ch.params) == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull",
    }
    assert ch.realm == "https://auth.docker.io/token"
    assert ch.service == "registry.docker.io"


def test_distribution_basic_challenge() -> None:
    assert parse_challenges('Basic realm="Registry Realm"') == [
        Challenge("basic", {"realm": "Registry Realm"})
    ]


def test_bearer_error_challenge_with_spaces_around_equals_and_commas() -> None:
    header = (
        'Bearer  realm = "https://ghcr.io/token" ,service="ghcr.io" , error="insufficient_scope"'
    )
    [ch] = parse_challenges(header)
    assert dict(ch.params) == {
        "realm": "https://ghcr.io/token",
        "service": "ghcr.io",
        "error": "insufficient_scope",
    }


def test_scheme_and_param_names_are_lowercased_values_are_not() -> None:
    [ch] = parse_challenges('BEARER Realm="https://Example.com/Token",SERVICE=Reg')
    assert ch.scheme == "bearer"
    assert dict(ch.params) == {"realm": "https://Example.com/Token", "service": "Reg"}


def test_quoted_strings_with_escapes_and_commas() -> None:
    [ch] = parse_challenges(r'Basic realm="a \"quoted\", comma\\ realm", charset="UTF-8"')
    assert dict(ch.params) == {"realm": 'a "quoted", comma\\ realm', "charset": "UTF-8"}


def test_several_challenges_in_one_header() -> None:
    header = 'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"'
    challenges = parse_challenges(header)
    assert [c.scheme for c in challenges] == ["newauth", "basic"]
    assert dict(challenges[0].params) == {"realm": "apps", "type": "1", "title": 'Login to "apps"'}
    assert dict(challenges[1].params) == {"realm": "simple"}


def test_scheme_without_params_and_token68() -> None:
    challenges = parse_challenges("Negotiate, NTLM abc+/def==, Bearer realm=x")
    assert [(c.scheme, c.token68) for c in challenges] == [
        ("negotiate", None),
        ("ntlm", "abc+/def=="),
        ("bearer", None),
    ]
    assert dict(challenges[2].params) == {"realm": "x"}


def test_unquoted_url_value_is_accepted() -> None:
    [ch] = parse_challenges("Bearer realm=https://auth.example.com/token,service=registry")
    assert dict(ch.params) == {"realm": "https://auth.example.com/token", "service": "registry"}


def test_first_duplicate_param_wins() -> None:
    [ch] = parse_challenges('Bearer realm="first", realm="second"')
    assert ch.realm == "first"


def test_empty_header_has_no_challenges() -> None:
    assert parse_challenges("") == []
    assert parse_challenges(" , ") == []


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ('Bearer realm="unterminated', "unterminated quoted string"),
        ('realm="x"', "parameter 'realm' outside a challenge"),
        ('Bearer realm="x" @', "unexpected '@'"),
    ],
)
def test_malformed_headers(header: str, problem: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_challenges(header)
    assert "malformed WWW-Authenticate header" in str(info.value)
    assert repr(header) in str(info.value)
    assert problem in str(info.value)


def test_params_are_read_only() -> None:
    [ch] = parse_challenges('Basic realm="r"')
    with pytest.raises(TypeError):
        ch.params["realm"] = "x"  # type: ignore[index]


def test_scope_for() -> None:
    assert scope_for("library/alpine", ["pull", "push"]) == "repository:library/alpine:pull,push"
    assert scope_for("a/b", ["pull", "pull"]) == "repository:a/b:pull"
    with pytest.raises(ValueError, match="at least one action"):
        scope_for("a/b", [])


def test_token_request_params_merges_the_challenge_scope() -> None:
    ch = Challenge(
        "bearer",
        {
            "realm": "https://auth.docker.io/token",
            "service": "registry.docker.io",
            "scope": "repository:library/alpine:pull repository:other/x:pull",
        },
    )
    params = token_request_params(ch, ["repository:library/alpine:push"])
    assert params == [
        ("service", "registry.docker.io"),
        ("scope", "repository:library/alpine:push,pull"),
        ("scope", "repository:other/x:pull"),
    ]


def test_token_request_params_without_service_or_challenge_scope() -> None:
    ch = Challenge("bearer", {"realm": "https://r/token"})
    assert token_request_params(ch, ["repository:a:pull", "repository:b:pull"]) == [
        ("scope", "repository:a:pull"),
        ("scope", "repository:b:pull"),
    ]
    assert token_request_params(ch, []) == []


def test_token_request_params_passes_odd_scopes_through() -> None:
    ch = Challenge("bearer", {"realm": "r", "scope": "registry:catalog:*"})
    assert token_request_params(ch, ["weird"]) == [
        ("scope", "weird"),
        ("scope", "registry:catalog:*"),
    ]


def test_token_response_with_token_and_expiry() -> None:
    body = json.dumps(
        {
            "token": "abc",
            "access_token": "abc",
            "expires_in": 300,
            "issued_at": "2024-01-01T00:00:00Z",
        }
    ).encode()
    token = parse_token_response(body, now=1000.0)
    assert token == Token("abc", 1300.0, None, "2024-01-01T00:00:00Z")


def test_token_response_access_token_only_and_default_lifetime() -> None:
    token = parse_token_response(b'{"access_token": "xyz"}', now=50.0)
    assert (token.value, token.expires_at) == ("xyz", 110.0)


def test_token_lifetime_is_at_least_sixty_seconds() -> None:
    assert parse_token_response(b'{"token": "t", "expires_in": 5}', now=0.0).expires_at == 60.0


def test_expiry_ignores_a_skewed_issued_at() -> None:
    body = b'{"token": "t", "expires_in": 300, "issued_at": "1999-01-01T00:00:00Z"}'
    assert parse_token_response(body, now=10_000.0).expires_at == 10_300.0


def test_refresh_token_is_kept_and_secrets_stay_out_of_repr() -> None:
    token = parse_token_response(b'{"token": "secret1", "refresh_token": "secret2"}', now=0.0)
    assert token.refresh_token == "secret2"
    assert "secret" not in repr(token)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b"{}", "no token or access_token"),
        (b'{"token": ""}', "no token or access_token"),
        (b'{"token": 5}', "no token or access_token"),
        (b'{"token": "t", "expires_in": "300"}', "non-numeric expires_in '300'"),
        (b'{"token": "t", "expires_in": Infinity}', "non-finite expires_in inf"),
        (b'{"token": "t", "expires_in": NaN}', "non-finite expires_in nan"),
        (b'{"token": "t", "expires_in": 1' + b"0" * 400 + b"}", "non-finite expires_in 1000"),
    ],
)
def test_bad_token_responses(body: bytes, problem: str) -> None:
    with pytest.raises(Unauthorized) as info:
        parse_token_response(body, now=0.0)
    assert problem in str(info.value)
    assert "token server" in str(info.value)
