package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// selfTest copies the checkout, points sqlitestore's require of the root
// module at a version nobody publishes, and expects the check to fail with
// a message that names sqlitestore; then, with that undone, puts two files
// whose names differ only in case into pgstore and expects a failure that
// names pgstore and the file; then, with that undone, makes the root
// module import a module it does not require, and expects a failure that
// names the root module.
func selfTest(repo, version string) error {
	files, err := repoFiles(repo)
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "bulkexport-consumer-selftest-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	for _, f := range files {
		if err := copyFile(filepath.Join(repo, filepath.FromSlash(f)), filepath.Join(tmp, filepath.FromSlash(f))); err != nil {
			return err
		}
	}
	gomod := filepath.Join(tmp, "sqlitestore", "go.mod")
	data, err := os.ReadFile(gomod)
	if err != nil {
		return err
	}
	broken := strings.Replace(string(data), rootPath+" "+version, rootPath+" v0.9.9", 1)
	if broken == string(data) {
		return fmt.Errorf("self-test: sqlitestore/go.mod does not require %s %s", rootPath, version)
	}
	if err := os.WriteFile(gomod, []byte(broken), 0o644); err != nil {
		return err
	}
	// git ls-files needs a repository: the copy is one.
	if err := gitInit(tmp); err != nil {
		return err
	}
	err = check(tmp, repo, version, false, func(string, ...any) {})
	if err == nil {
		return fmt.Errorf("self-test: the check passed although sqlitestore requires %s@v0.9.9", rootPath)
	}
	if !strings.Contains(err.Error(), rootPath+"/sqlitestore") || !strings.Contains(err.Error(), "v0.9.9") {
		return fmt.Errorf("self-test: the check failed without naming the module and version:\n%v", err)
	}
	fmt.Fprintf(os.Stderr, "self-test: a require of an unpublished version fails the check:\n%s\n", indent(err.Error()))

	// Second: a file the module zip rules refuse (two names that differ
	// only in case) in pgstore.
	if err := os.WriteFile(gomod, data, 0o644); err != nil {
		return err
	}
	src, err := os.ReadFile(filepath.Join(tmp, "pgstore", "pgstore.go"))
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, "pgstore", "PGSTORE.go"), src, 0o644); err != nil {
		return err
	}
	err = check(tmp, repo, version, false, func(string, ...any) {})
	if err == nil {
		return fmt.Errorf("self-test: the check passed although pgstore holds pgstore.go and PGSTORE.go")
	}
	if !strings.Contains(err.Error(), rootPath+"/pgstore:") || !strings.Contains(err.Error(), "PGSTORE.go") {
		return fmt.Errorf("self-test: the check failed without naming the module and file:\n%v", err)
	}
	fmt.Fprintf(os.Stderr, "self-test: a file the zip rules refuse fails the check:\n%s\n", indent(err.Error()))

	// Third: a package of the root module imports a module (golang.org/x/mod,
	// which the check itself uses) that the root's go.mod does not
	// require. This one gets as far as go get and the first program.
	if err := os.Remove(filepath.Join(tmp, "pgstore", "PGSTORE.go")); err != nil {
		return err
	}
	orphan := "package bulkexport\n\nimport _ \"golang.org/x/mod/semver\"\n"
	if err := os.WriteFile(filepath.Join(tmp, "selftest_orphan.go"), []byte(orphan), 0o644); err != nil {
		return err
	}
	err = check(tmp, repo, version, false, func(string, ...any) {})
	if err == nil {
		return fmt.Errorf("self-test: the check passed although the root module imports golang.org/x/mod without requiring it")
	}
	if !strings.Contains(err.Error(), "module "+rootPath+": package "+rootPath+" imports golang.org/x/mod/semver") {
		return fmt.Errorf("self-test: the check failed without naming the importing module:\n%v", err)
	}
	fmt.Fprintf(os.Stderr, "self-test: an import of a module the go.mod does not require fails the check:\n%s\n", indent(err.Error()))
	return nil
}

func copyFile(src, dst string) error {
	fi, err := os.Lstat(src)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, fi.Mode().Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func gitInit(dir string) error {
	for _, args := range [][]string{{"init", "-q"}, {"add", "-A"}} {
		cmd := execGit(dir, args...)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("git %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}
