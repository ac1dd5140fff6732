#!/usr/bin/env python3
"""Replays, with the standard library only, the requests that Inferno's
bulk-data test kit (v1.0.1 and v2.0.0 server suites) sends after its TLS and
SMART groups, and reports each check the way docs/conformance.md §2 numbers it.

It is not Inferno: it does no FHIR validation of the exported resources (part
of #11) and no TLS or SMART checks (#1-#3, #9). It exists so that a change to
the server (for instance -profile) can be checked in seconds without Docker.

    python3 examples/conformance/inferno-like-checks.py http://127.0.0.1:8080/fhir \
        [--token TOKEN] [--group cohort-3]

Exit status 0 when every check that ran passed, 1 otherwise.
"""
import argparse
import datetime
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

results = []


def check(num, name, ok, detail=""):
    results.append(ok)
    print(f"  #{num:<3} {'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""))


def skip(num, name, why):
    print(f"  #{num:<3} SKIP  {name}  ({why})")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


opener = urllib.request.build_opener(NoRedirect)


def call(method, url, headers):
    """Returns (status, headers, body bytes); never raises on an HTTP status."""
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with opener.open(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def auth(token):
    return {"Authorization": f"Bearer {token}"} if token else {}


def kickoff(url, token):
    return call("GET", url, {"Accept": "application/fhir+json", "Prefer": "respond-async", **auth(token)})


def delete(poll_url, token):
    return call("DELETE", poll_url, {"Accept": "application/json", **auth(token)})


def is_outcome(body):
    try:
        return json.loads(body).get("resourceType") == "OperationOutcome"
    except ValueError:
        return False


def poll(poll_url, token, limit=180):
    start, wait = time.time(), 1
    while True:
        status, hdrs, body = call("GET", poll_url, {"Accept": "application/json", **auth(token)})
        if status != 202 or time.time() - start > limit:
            return status, hdrs, body
        ra = hdrs.get("Retry-After", "")
        time.sleep(int(ra) if ra.isdigit() else wait)
        wait *= 2


def level(title, url, token, v2):
    print(f"{title}: {url}")
    if token:
        s, _, _ = kickoff(url, None)
        check(5, "kick-off without a token gets 400 or 401", s in (400, 401), f"got {s}")
    else:
        skip(5, "kick-off without a token", "no token given")

    s, h, _ = kickoff(url, token)
    loc = h.get("Content-Location") if s == 202 else None
    check(6, "kick-off: 202 with Content-Location", bool(loc), f"got {s}")
    if not loc:
        return
    s, h, body = poll(loc, token)
    fields = ("transactionTime", "request", "requiresAccessToken", "output", "error")
    try:
        manifest = json.loads(body)
    except ValueError:
        manifest = {}
    ok = s == 200 and "application/json" in h.get("Content-Type", "") and all(f in manifest for f in fields)
    check(7, "status: 200, application/json, all manifest fields", ok, f"got {s} {h.get('Content-Type')}")
    if not ok:
        return
    output = manifest["output"]
    ok = bool(output) and all("type" in o and "url" in o for o in output)
    if v2:
        ok = ok and all(o["url"].startswith(("http://", "https://")) for o in output)
    check(8, "output items have type and (absolute) url", ok, f"{len(output)} items")
    if not output:
        return
    if manifest["requiresAccessToken"]:
        s, _, _ = call("GET", output[0]["url"], {"Accept": "application/fhir+ndjson"})
        check(10, "file without a token gets 400 or 401", s in (400, 401), f"got {s}")
    else:
        skip(10, "file without a token", "requiresAccessToken is false")
    bad, patients, lines = [], set(), 0
    file_auth = auth(token) if manifest["requiresAccessToken"] else {}
    for o in output:
        s, h, body = call("GET", o["url"], {"Accept": "application/fhir+ndjson", **file_auth})
        if s != 200 or not h.get("Content-Type", "").startswith("application/fhir+ndjson"):
            bad.append(f"{o['type']}: {s} {h.get('Content-Type')}")
            continue
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            lines += 1
            r = json.loads(line)
            if r.get("resourceType") != o["type"]:
                bad.append(f"{o['type']} file holds {r.get('resourceType')}")
            if r.get("resourceType") == "Patient":
                patients.add(r.get("id"))
    check(11, "files: fhir+ndjson, every line of the item's type (no FHIR validation)", not bad,
          "; ".join(bad[:3]) or f"{lines} resources in {len(output)} files")
    check(12, "at least 2 distinct Patient ids", len(patients) >= 2, f"{len(patients)}")

    s, h, _ = kickoff(url, token)
    loc = h.get("Content-Location")
    ds, _, _ = delete(loc, token) if loc else (None, None, None)
    check(13, "cancel: kick-off 202, then DELETE 202", s == 202 and ds == 202, f"kick-off {s}, DELETE {ds}")
    if v2:
        if ds == 202:
            ps, _, body = call("GET", loc, {"Accept": "application/json", **auth(token)})
            check(14, "poll after cancel: 404 with an OperationOutcome", ps == 404 and is_outcome(body), f"got {ps}")
        else:
            skip(14, "poll after cancel", "the cancel did not succeed")
        sep = "&" if "?" in url else "?"
        for fmt in ("application/fhir+ndjson", "application/ndjson", "ndjson"):
            s, h, _ = kickoff(url + sep + "_outputFormat=" + urllib.parse.quote(fmt, safe=""), token)
            loc = h.get("Content-Location")
            ds, _, _ = delete(loc, token) if loc else (None, None, None)
            check(15, f"_outputFormat={fmt}: 202, then DELETE 202", s == 202 and ds == 202,
                  f"kick-off {s}, DELETE {ds}")
        since = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(weeks=1)).replace(microsecond=0)
        s, h, _ = kickoff(url + sep + "_since=" + urllib.parse.quote(since.isoformat(), safe=""), token)
        loc = h.get("Content-Location")
        ds, _, _ = delete(loc, token) if loc else (None, None, None)
        check(16, "_since one week ago: 202, then DELETE 202", s == 202 and ds == 202, f"kick-off {s}, DELETE {ds}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="FHIR base URL, e.g. http://127.0.0.1:8080/fhir")
    ap.add_argument("--token", help="bearer token (the server's -clients TOKEN)")
    ap.add_argument("--group", default="cohort-3", help="Group id for the Group flow")
    ap.add_argument("--v1", action="store_true", help="only what the v1.0.1 suite checks")
    a = ap.parse_args()
    base = a.base.rstrip("/")
    v2 = not a.v1

    print(f"metadata: {base}/metadata")
    s, _, body = call("GET", base + "/metadata", {"Accept": "application/fhir+json", **auth(a.token)})
    try:
        cs = json.loads(body)
        rest = cs["rest"][0]
        ops = {r["type"]: r.get("operation", []) for r in rest.get("resource", [])}
        ok = s == 200 and rest.get("operation") and ops.get("Patient") and ops.get("Group")
        named = all(any(o.get("name") == "export" for o in x) for x in (rest["operation"], ops["Patient"], ops["Group"]))
        inst = any(u.startswith("http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data")
                   for u in cs.get("instantiates", []))
        check(4, "metadata declares system, Patient and Group operations", bool(ok),
              f"named export: {named}; instantiates bulk-data: {inst}")
    except (ValueError, KeyError, IndexError, TypeError):
        check(4, "metadata parses as a CapabilityStatement", False, f"got {s}")

    level("Group", f"{base}/Group/{a.group}/$export", a.token, v2)
    level("Patient", f"{base}/Patient/$export", a.token, v2)
    level("System", f"{base}/$export", a.token, v2)
    failed = results.count(False)
    print(f"{len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
