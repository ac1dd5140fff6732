package main

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"golang.org/x/mod/modfile"
)

// A program is one small consumer: a fresh module that gets some of the
// repository's modules and builds against them.
type program struct {
	name    string
	modules []string // modules of the repository it gets (paths below rootPath, "" for the root)
	extra   []string // third-party modules it imports itself, at the version go get picks
	source  func(repo string) (string, error)
	// notInBuild lists module path prefixes that must not be part of the
	// build: test-only dependencies of the modules it uses.
	notInBuild []string
}

var programs = []program{
	{name: "readme", modules: []string{""}, source: readmeProgram},
	{name: "sqlitestore", modules: []string{"", "sqlitestore"}, extra: []string{"modernc.org/sqlite"}, source: constSource(sqliteProgram)},
	{name: "pgstore", modules: []string{"", "pgstore"}, extra: []string{"github.com/jackc/pgx/v5"}, source: constSource(pgProgram)},
	{name: "blobstorage", modules: []string{"", "blobstorage"}, extra: []string{"gocloud.dev"}, source: constSource(blobProgram),
		notInBuild: []string{"github.com/johannesboyne/gofakes3", "github.com/aws/"}},
}

func constSource(s string) func(string) (string, error) {
	return func(string) (string, error) { return s, nil }
}

func modPath(sub string) string {
	if sub == "" {
		return rootPath
	}
	return rootPath + "/" + sub
}

// env is the environment of a user's "go" outside this repository: no
// workspace, the file proxy first, no checksum database for the modules
// of this repository (they are not published yet), and a module cache of
// its own so that a module of an earlier run at the same version is never
// taken for this checkout's.
type env struct {
	proxy, modcache, gopath string
}

func (e env) vars(extra ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "GOWORK", "GOFLAGS", "GODEBUG", "GOPROXY", "GONOSUMDB", "GONOPROXY", "GOPRIVATE", "GOMODCACHE", "GOTOOLCHAIN", "GOBIN", "GOPATH":
			continue
		}
		out = append(out, kv)
	}
	out = append(out,
		"GOWORK=off",
		"GOFLAGS=-mod=mod",
		"GOPROXY="+e.proxy,
		"GONOSUMDB="+rootPath,
		"GOMODCACHE="+e.modcache,
		"GOPATH="+e.gopath,
		"GOTOOLCHAIN=local",
		// The module cache is reused between runs, with this repository's
		// modules removed and fetched again: the go command's index of the
		// module cache (which takes a module version's files never to
		// change) must not remember an earlier run's file list.
		"GODEBUG=goindex=0",
	)
	return append(out, extra...)
}

func (e env) run(dir string, extra []string, args ...string) (string, error) {
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	cmd.Env = e.vars(extra...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("go %s (in %s): %v\n%s", strings.Join(args, " "), dir, err, indent(out.String()))
	}
	return out.String(), nil
}

func indent(s string) string {
	s = strings.TrimRight(s, "\n")
	return "\t" + strings.ReplaceAll(s, "\n", "\n\t")
}

// privateModCache is the module cache of the consumer check: one per
// checkout, kept between runs so that third-party packages are not
// compiled again, emptied of this repository's modules before each run so
// that a zip of an earlier run at the same version is never used.
func privateModCache(repo string) (string, error) {
	sum := sha256.Sum256([]byte(repo))
	dir := filepath.Join(os.TempDir(), fmt.Sprintf("bulkexport-consumer-modcache-%x", sum[:6]))
	for _, d := range []string{filepath.Join(dir, filepath.FromSlash(rootPath)), filepath.Join(dir, "cache", "download", filepath.FromSlash(rootPath))} {
		if err := removeReadOnly(d); err != nil {
			return "", err
		}
	}
	// The extracted trees are named path@version, next to the others.
	matches, _ := filepath.Glob(filepath.Join(dir, filepath.FromSlash(rootPath)+"@*"))
	for _, m := range matches {
		if err := removeReadOnly(m); err != nil {
			return "", err
		}
	}
	return dir, os.MkdirAll(dir, 0o755)
}

// removeReadOnly removes a tree of the module cache, whose directories are
// read-only.
func removeReadOnly(dir string) error {
	if _, err := os.Lstat(dir); err != nil {
		return nil
	}
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			_ = os.Chmod(p, 0o755)
		}
		return nil
	})
	return os.RemoveAll(dir)
}

// check runs the whole consumer check on the checkout at repo.
// The module cache is the one of cacheRepo (repo itself, or the checkout a
// self-test copied).
func check(repo, cacheRepo, version string, keep bool, log func(string, ...any)) error {
	upstream, err := upstreamProxy()
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "bulkexport-consumer-")
	if err != nil {
		return err
	}
	if !keep {
		defer os.RemoveAll(tmp)
	}
	proxyDir := filepath.Join(tmp, "proxy")
	mods, err := buildProxy(repo, version, proxyDir, log)
	if err != nil {
		return err
	}
	modcache, err := privateModCache(cacheRepo)
	if err != nil {
		return err
	}
	e := env{modcache: modcache, gopath: filepath.Join(tmp, "gopath")}
	e.proxy = proxyList(proxyDir, upstream)

	for _, p := range programs {
		if err := checkProgram(repo, version, tmp, mods, e, p, log); err != nil {
			return fmt.Errorf("program %q: %w", p.name, err)
		}
	}

	// The command-line client, the way its documentation installs it.
	bin := filepath.Join(tmp, "bin")
	cli := rootPath + "/cmd/bulkexport@" + version
	if _, err := e.run(tmp, []string{"GOFLAGS=", "GOBIN=" + bin}, "install", cli); err != nil {
		return fmt.Errorf("go install %s: %w", cli, err)
	}
	if _, err := os.Stat(filepath.Join(bin, "bulkexport")); err != nil {
		return fmt.Errorf("go install %s made no binary: %v", cli, err)
	}
	log("consumer: go install %s: ok", cli)
	return nil
}

func checkProgram(repo, version, tmp string, mods []*localModule, e env, p program, log func(string, ...any)) error {
	dir := filepath.Join(tmp, "consumer-"+p.name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	src, err := p.source(repo)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(src), 0o644); err != nil {
		return err
	}
	if _, err := e.run(dir, nil, "mod", "init", "example.com/consumer/"+p.name); err != nil {
		return err
	}
	// go get each module of the repository at the published version, then
	// the third-party modules the program itself imports.
	var gets []string
	for _, m := range p.modules {
		gets = append(gets, modPath(m)+"@"+version)
	}
	if out, err := e.run(dir, nil, append([]string{"get"}, gets...)...); err != nil {
		return fmt.Errorf("%w%s", err, blame(out))
	}
	for _, x := range p.extra {
		if _, err := e.run(dir, nil, "get", x); err != nil {
			return err
		}
	}
	if _, err := e.run(dir, nil, "mod", "tidy"); err != nil {
		return err
	}
	before, _ := os.ReadFile(filepath.Join(dir, "go.mod"))
	if _, err := e.run(dir, nil, "build", "-o", filepath.Join(tmp, "prog-"+p.name), "."); err != nil {
		return err
	}
	if _, err := e.run(dir, nil, "vet", "."); err != nil {
		return err
	}
	after, _ := os.ReadFile(filepath.Join(dir, "go.mod"))
	if !bytes.Equal(before, after) {
		return fmt.Errorf("building changed the consumer's go.mod:\n%s\n--- after:\n%s", before, after)
	}
	// The versions the consumer got are those the go.mod files name.
	mf, err := modfile.Parse("go.mod", after, nil)
	if err != nil {
		return err
	}
	for _, r := range mf.Require {
		if (r.Mod.Path == rootPath || strings.HasPrefix(r.Mod.Path, rootPath+"/")) && r.Mod.Version != version {
			return fmt.Errorf("the consumer got %s@%s, not %s", r.Mod.Path, r.Mod.Version, version)
		}
	}
	// Every package of this repository in the build imports only modules
	// its own go.mod requires: a missing require is otherwise made up for
	// by the consumer's go.mod (or by chance by another dependency's).
	listing, err := e.run(dir, nil, "list", "-deps", "-f", "{{if .Module}}{{.Module.Path}}{{end}}|{{.ImportPath}}|{{join .Imports \" \"}}", ".")
	if err != nil {
		return err
	}
	moduleOf := map[string]string{}
	type pkg struct {
		module, path string
		imports      []string
	}
	var pkgs []pkg
	for _, line := range strings.Split(strings.TrimSpace(listing), "\n") {
		f := strings.SplitN(line, "|", 3)
		if len(f) != 3 {
			continue
		}
		moduleOf[f[1]] = f[0]
		pkgs = append(pkgs, pkg{f[0], f[1], strings.Fields(f[2])})
	}
	requires := map[string]map[string]bool{}
	for _, m := range mods {
		requires[m.Path] = map[string]bool{}
		for _, r := range m.File.Require {
			requires[m.Path][r.Mod.Path] = true
		}
	}
	var missing []string
	for _, p := range pkgs {
		req, local := requires[p.module]
		if !local {
			continue
		}
		for _, imp := range p.imports {
			im := moduleOf[imp]
			if im == "" || im == p.module || req[im] {
				continue
			}
			missing = append(missing, fmt.Sprintf("module %s: package %s imports %s, but its go.mod does not require %s", p.module, p.path, imp, im))
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		return fmt.Errorf("a package imports a module its go.mod does not require:\n\t%s", strings.Join(missing, "\n\t"))
	}
	// Test-only dependencies stay out of the consumer's build.
	if len(p.notInBuild) > 0 {
		mods, err := e.run(dir, nil, "list", "-deps", "-f", "{{with .Module}}{{.Path}}{{end}}", ".")
		if err != nil {
			return err
		}
		for _, m := range strings.Fields(mods) {
			for _, bad := range p.notInBuild {
				if strings.HasPrefix(m, bad) {
					return fmt.Errorf("the consumer's build includes %s, a test-only dependency", m)
				}
			}
		}
	}
	log("consumer: %s: go get %s, build, vet: ok", p.name, strings.Join(gets, " "))
	return nil
}

// blame picks out of a failed "go get" the module paths of this
// repository it names, so that the failure says which module is broken.
var moduleRE = regexp.MustCompile(regexp.QuoteMeta(rootPath) + `(/[a-z0-9]+)*@v[0-9][^\s:]*`)

func blame(out string) string {
	found := map[string]bool{}
	for _, m := range moduleRE.FindAllString(out, -1) {
		found[m] = true
	}
	if len(found) == 0 {
		return ""
	}
	var list []string
	for m := range found {
		list = append(list, m)
	}
	sort.Strings(list)
	return "\n\tmodules named: " + strings.Join(list, ", ")
}

// The README's "Use it in your server" snippet lies between these markers;
// the readme program wraps it in a function, so that it cannot drift from
// the API.
const (
	beginMarker = "<!-- consumer-check: begin server snippet -->"
	endMarker   = "<!-- consumer-check: end server snippet -->"
)

func readmeSnippet(repo string) (string, error) {
	data, err := os.ReadFile(filepath.Join(repo, "README.md"))
	if err != nil {
		return "", err
	}
	s := string(data)
	_, rest, ok := strings.Cut(s, beginMarker)
	if !ok {
		return "", errors.New("README.md has no " + beginMarker)
	}
	block, _, ok := strings.Cut(rest, endMarker)
	if !ok {
		return "", errors.New("README.md has no " + endMarker)
	}
	block = strings.TrimSpace(block)
	if !strings.HasPrefix(block, "```go\n") || !strings.HasSuffix(block, "\n```") {
		return "", errors.New("README.md: the server snippet between the markers must be one ```go block")
	}
	return strings.TrimSuffix(strings.TrimPrefix(block, "```go\n"), "\n```"), nil
}

func readmeProgram(repo string) (string, error) {
	snippet, err := readmeSnippet(repo)
	if err != nil {
		return "", err
	}
	return strings.Replace(readmeWrapper, "\t// SNIPPET\n", snippet+"\n", 1), nil
}

// The README snippet runs inside serve, where ctx, mux, mySource and
// clientFromToken are what the host has.
const readmeWrapper = `// The README's "Use it in your server" snippet, as a program.
package main

import (
	"context"
	"errors"
	"log"
	"net/http"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

type source struct{}

func (source) ResourceTypes(ctx context.Context, level fhirbulk.Level) ([]string, error) {
	return []string{"Patient"}, nil
}

func (source) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	return nil
}

func serve(ctx context.Context, mux *http.ServeMux, mySource bulkexport.Source, clientFromToken func(*http.Request) (string, error)) error {
	// SNIPPET
	return nil
}

func main() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	auth := func(r *http.Request) (string, error) { return "", errors.New("no token") }
	if err := serve(ctx, http.NewServeMux(), source{}, auth); err != nil {
		log.Fatal(err)
	}
}
`

const sqliteProgram = `// The root handler with sqlitestore.
package main

import (
	"context"
	"database/sql"
	"log"
	"net/http"
	"os"
	"path/filepath"

	_ "modernc.org/sqlite"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"github.com/bulkfhir/bulkexport/sqlitestore"
)

type source struct{}

func (source) ResourceTypes(ctx context.Context, level fhirbulk.Level) ([]string, error) {
	return []string{"Patient"}, nil
}

func (source) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	return nil
}

func main() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "consumer")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "jobs.db")+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	store, err := sqlitestore.New(db, nil)
	if err != nil {
		log.Fatal(err)
	}
	if err := store.Migrate(ctx); err != nil {
		log.Fatal(err)
	}
	files, err := bulkexport.NewDirStorage(filepath.Join(dir, "files"))
	if err != nil {
		log.Fatal(err)
	}
	h, err := bulkexport.NewHandler(store, &bulkexport.Options{BaseURL: "https://fhir.example.org/fhir", Types: source{}, Storage: files})
	if err != nil {
		log.Fatal(err)
	}
	http.Handle("/fhir/", h)
}
`

const pgProgram = `// The root handler with pgstore.
package main

import (
	"context"
	"log"
	"net/http"
	"os"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/pgstore"
)

func main() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	store, err := pgstore.New(pool, &pgstore.Options{Schema: "fhir"})
	if err != nil {
		log.Fatal(err)
	}
	files, err := bulkexport.NewDirStorage(os.TempDir())
	if err != nil {
		log.Fatal(err)
	}
	h, err := bulkexport.NewHandler(store, &bulkexport.Options{BaseURL: "https://fhir.example.org/fhir", Storage: files})
	if err != nil {
		log.Fatal(err)
	}
	http.Handle("/fhir/", h)
}
`

const blobProgram = `// The root handler with blobstorage.
package main

import (
	"log"
	"net/http"

	"gocloud.dev/blob/memblob"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/blobstorage"
)

func main() {
	bucket := memblob.OpenBucket(nil)
	defer bucket.Close()
	files, err := blobstorage.New(bucket, &blobstorage.Options{Prefix: "bulkexport/"})
	if err != nil {
		log.Fatal(err)
	}
	h, err := bulkexport.NewHandler(bulkexport.NewMemoryStore(), &bulkexport.Options{BaseURL: "https://fhir.example.org/fhir", Storage: files})
	if err != nil {
		log.Fatal(err)
	}
	http.Handle("/fhir/", h)
}
`
