package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/mod/modfile"
	"golang.org/x/mod/module"
	"golang.org/x/mod/semver"
	modzip "golang.org/x/mod/zip"
)

// A localModule is one module of the repository.
type localModule struct {
	Path  string // module path
	Dir   string // directory relative to the repository ("." for the root)
	GoMod []byte // its go.mod
	File  *modfile.File
	Files []string // its files, relative to the repository, nested modules excluded
}

// infoTime is the fixed time of every .info file, so that the proxy is the
// same from one run to the next.
const infoTime = "2026-01-01T00:00:00Z"

// repoFiles lists the files of the checkout as git sees them: tracked
// files (as they are in the work tree) and untracked files that are not
// ignored, so that a build output or an editor's file never reaches a zip.
// The consumer check's own module under .ci is not part of any module.
func repoFiles(repo string) ([]string, error) {
	cmd := exec.Command("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard")
	cmd.Dir = repo
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("git ls-files in %s: %v", repo, err)
	}
	seen := map[string]bool{}
	var files []string
	for _, f := range strings.Split(string(out), "\x00") {
		if f == "" || seen[f] {
			continue
		}
		seen[f] = true
		if _, err := os.Lstat(filepath.Join(repo, filepath.FromSlash(f))); err != nil {
			continue // deleted in the work tree
		}
		files = append(files, f)
	}
	sort.Strings(files)
	return files, nil
}

// findModules reads every go.mod of the checkout (outside .ci) and assigns
// each file to the innermost module that holds it.
func findModules(repo string) ([]*localModule, error) {
	files, err := repoFiles(repo)
	if err != nil {
		return nil, err
	}
	var mods []*localModule
	byDir := map[string]*localModule{}
	for _, f := range files {
		if path.Base(f) != "go.mod" || strings.HasPrefix(f, ".ci/") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(repo, filepath.FromSlash(f)))
		if err != nil {
			return nil, err
		}
		mf, err := modfile.Parse(f, data, nil)
		if err != nil {
			return nil, err
		}
		if mf.Module == nil {
			return nil, fmt.Errorf("%s has no module line", f)
		}
		dir := path.Dir(f)
		want := rootPath
		if dir != "." {
			want = rootPath + "/" + dir
		}
		if mf.Module.Mod.Path != want {
			return nil, fmt.Errorf("%s declares module %s; in this repository it must be %s", f, mf.Module.Mod.Path, want)
		}
		m := &localModule{Path: want, Dir: dir, GoMod: data, File: mf}
		mods = append(mods, m)
		byDir[dir] = m
	}
	if byDir["."] == nil {
		return nil, fmt.Errorf("no go.mod at the root of %s", repo)
	}
	for _, f := range files {
		if strings.HasPrefix(f, ".ci/") && hasModuleAbove(f, ".ci", files) {
			continue // the CI's own modules
		}
		// The innermost module directory above f.
		for d := path.Dir(f); ; d = path.Dir(d) {
			if m := byDir[d]; m != nil {
				m.Files = append(m.Files, f)
				break
			}
			if d == "." {
				break
			}
		}
	}
	sort.Slice(mods, func(i, j int) bool { return mods[i].Path < mods[j].Path })
	return mods, nil
}

// hasModuleAbove reports whether a go.mod in files lies in a directory
// between top and f.
func hasModuleAbove(f, top string, files []string) bool {
	set := map[string]bool{}
	for _, g := range files {
		if path.Base(g) == "go.mod" {
			set[path.Dir(g)] = true
		}
	}
	for d := path.Dir(f); d != "." && (d == top || strings.HasPrefix(d, top+"/")); d = path.Dir(d) {
		if set[d] {
			return true
		}
	}
	return false
}

// checkGraph refuses what makes "go get" fail for a user: a replace
// directive (ignored in a dependency), and a require of a module of this
// repository at a version that is not the one being published.
func checkGraph(mods []*localModule, version string) error {
	local := map[string]bool{}
	for _, m := range mods {
		local[m.Path] = true
	}
	var problems []string
	for _, m := range mods {
		gomod := path.Join(m.Dir, "go.mod")
		for _, r := range m.File.Replace {
			problems = append(problems, fmt.Sprintf("module %s (%s) has replace %s => %s: a replace is ignored when the module is a dependency; use go.work for local development",
				m.Path, gomod, r.Old.Path, r.New.Path))
		}
		for _, r := range m.File.Require {
			if !local[r.Mod.Path] && !strings.HasPrefix(r.Mod.Path, rootPath+"/") && r.Mod.Path != rootPath {
				continue
			}
			if !local[r.Mod.Path] {
				problems = append(problems, fmt.Sprintf("module %s (%s) requires %s@%s, which is no module of this repository",
					m.Path, gomod, r.Mod.Path, r.Mod.Version))
				continue
			}
			if r.Mod.Version != version {
				problems = append(problems, fmt.Sprintf("module %s (%s) requires %s@%s, an unpublished version: this checkout publishes %s@%s",
					m.Path, gomod, r.Mod.Path, r.Mod.Version, r.Mod.Path, version))
			}
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("the module graph is not release-ready:\n\t%s", strings.Join(problems, "\n\t"))
	}
	return nil
}

// A zipFile is one file of a module tree, for golang.org/x/mod/zip.
type zipFile struct {
	rel, abs string
}

func (f zipFile) Path() string                 { return f.rel }
func (f zipFile) Lstat() (os.FileInfo, error)  { return os.Lstat(f.abs) }
func (f zipFile) Open() (io.ReadCloser, error) { return os.Open(f.abs) }

// buildProxy writes the file proxy for every module of repo at version to
// dir and returns the modules.
func buildProxy(repo, version, dir string, log func(string, ...any)) ([]*localModule, error) {
	if !semver.IsValid(version) {
		return nil, fmt.Errorf("-version %q is not a semantic version", version)
	}
	mods, err := findModules(repo)
	if err != nil {
		return nil, err
	}
	if err := checkGraph(mods, version); err != nil {
		return nil, err
	}
	for _, m := range mods {
		var files []modzip.File
		for _, f := range m.Files {
			rel := f
			if m.Dir != "." {
				rel = strings.TrimPrefix(f, m.Dir+"/")
			}
			files = append(files, zipFile{rel: rel, abs: filepath.Join(repo, filepath.FromSlash(f))})
		}
		mv := module.Version{Path: m.Path, Version: version}
		checked, err := modzip.CheckFiles(files)
		if err != nil {
			var msgs []string
			for _, fe := range checked.Invalid {
				msgs = append(msgs, fmt.Sprintf("%s: %v", path.Join(m.Dir, fe.Path), fe.Err))
			}
			if len(msgs) == 0 {
				msgs = append(msgs, err.Error())
			}
			return nil, fmt.Errorf("module %s: its tree holds files the module zip rules refuse:\n\t%s", m.Path, strings.Join(msgs, "\n\t"))
		}
		var zipBuf bytes.Buffer
		if err := modzip.Create(&zipBuf, mv, files); err != nil {
			return nil, fmt.Errorf("module %s: zip: %v", m.Path, err)
		}
		esc, err := module.EscapePath(m.Path)
		if err != nil {
			return nil, err
		}
		vdir := filepath.Join(dir, filepath.FromSlash(esc), "@v")
		if err := os.MkdirAll(vdir, 0o755); err != nil {
			return nil, err
		}
		info := fmt.Sprintf("{\"Version\":%q,\"Time\":%q}\n", version, infoTime)
		for name, data := range map[string][]byte{
			"list":            []byte(version + "\n"),
			version + ".info": []byte(info),
			version + ".mod":  m.GoMod,
			version + ".zip":  zipBuf.Bytes(),
		} {
			if err := os.WriteFile(filepath.Join(vdir, name), data, 0o644); err != nil {
				return nil, err
			}
		}
		log("proxy: %s@%s (%d files, %d omitted by the zip rules)", m.Path, version, len(checked.Valid), len(checked.Omitted))
	}
	return mods, nil
}

func execGit(dir string, args ...string) *exec.Cmd {
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	return cmd
}
