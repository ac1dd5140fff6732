// Command consumer checks that every module of the repository works for a
// user who runs "go get", not only inside the workspace.
//
// It builds a file-system module proxy from the checkout (every module at
// the version the go.mod files name, zipped by golang.org/x/mod/zip under
// the module zip rules), then, in fresh temporary modules with GOWORK=off,
// gets the modules from that proxy (third-party modules come from the
// upstream proxy of "go env GOPROXY"), builds and vets small programs that
// use them, and installs the command-line client with "go install
// ...@version".
//
// Usage (from .ci/consumer, outside the workspace):
//
//	GOWORK=off go run . -repo ../..                 # the whole check
//	GOWORK=off go run . -repo ../.. -proxy-only DIR # just the proxy, for other CI steps
//	GOWORK=off go run . -repo ../.. -selftest       # the check must fail on a broken require
//	GOWORK=off go run . -repo ../.. -deps           # one version of each shared dependency
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// rootPath is the module path of the repository's root module; every
// module of the repository is this path or below it.
const rootPath = "github.com/bulkfhir/bulkexport"

func main() {
	repo := flag.String("repo", "../..", "the repository checkout")
	version := flag.String("version", "v0.1.0", "the version every module is published at (the next release)")
	proxyOnly := flag.String("proxy-only", "", "build the file proxy in this directory, print GOPROXY, GOMODCACHE, GONOSUMDB and GODEBUG lines for the shell, and stop")
	selftest := flag.Bool("selftest", false, "check that the check fails, naming the module, when a sub-module requires an unpublished version")
	keep := flag.Bool("keep", false, "keep the temporary directories")
	deps := flag.Bool("deps", false, "check that the modules require one version of each shared dependency, and stop")
	flag.Parse()
	log := func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }

	abs, err := filepath.Abs(*repo)
	if err != nil {
		fail(err)
	}
	if *deps {
		if err := checkDeps(abs, log); err != nil {
			fail(err)
		}
		return
	}
	if *selftest {
		if err := selfTest(abs, *version); err != nil {
			fail(err)
		}
		log("consumer check self-test: ok (a require of an unpublished version, a file the zip rules refuse, and an import of a module not required each fail the check, naming the module)")
		return
	}
	if *proxyOnly != "" {
		mods, err := buildProxy(abs, *version, *proxyOnly, log)
		if err != nil {
			fail(err)
		}
		upstream, err := upstreamProxy()
		if err != nil {
			fail(err)
		}
		modcache, err := privateModCache(abs)
		if err != nil {
			fail(err)
		}
		log("file proxy %s: %d modules at %s", *proxyOnly, len(mods), *version)
		// For the shell: the environment of a "go" that gets this
		// repository's modules from the proxy, with a module cache that
		// holds no earlier zip of them.
		// (GODEBUG=goindex=0: see env.vars.)
		fmt.Printf("GOPROXY=%s\nGOMODCACHE=%s\nGONOSUMDB=%s\nGODEBUG=goindex=0\n", proxyList(*proxyOnly, upstream), modcache, rootPath)
		return
	}
	if err := check(abs, abs, *version, *keep, log); err != nil {
		fail(err)
	}
	log("consumer check: ok")
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "consumer check FAILED: %v\n", err)
	os.Exit(1)
}

// upstreamProxy is the GOPROXY list of the environment, where third-party
// modules come from.
func upstreamProxy() (string, error) {
	cmd := exec.Command("go", "env", "GOPROXY")
	cmd.Env = append(os.Environ(), "GOWORK=off")
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go env GOPROXY: %v", err)
	}
	up := strings.TrimSpace(string(out))
	if up == "" || up == "off" {
		return "", errors.New("go env GOPROXY is empty or off: third-party modules cannot be fetched")
	}
	return up, nil
}

// proxyList puts the file proxy first, then the module cache's download
// directory (a valid file proxy, so that modules already downloaded are
// not fetched again), then the upstream list.
func proxyList(dir, upstream string) string {
	list := []string{fileURL(dir)}
	if cache := goEnv("GOMODCACHE"); cache != "" {
		if _, err := os.Stat(filepath.Join(cache, "cache", "download")); err == nil {
			list = append(list, fileURL(filepath.Join(cache, "cache", "download")))
		}
	}
	return strings.Join(append(list, upstream), ",")
}

func fileURL(dir string) string {
	abs, _ := filepath.Abs(dir)
	return "file://" + filepath.ToSlash(abs)
}

func goEnv(name string) string {
	cmd := exec.Command("go", "env", name)
	cmd.Env = append(os.Environ(), "GOWORK=off")
	out, err := cmd.Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}
