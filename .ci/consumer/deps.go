package main

import (
	"fmt"
	"path"
	"sort"
	"strings"

	"golang.org/x/mod/semver"
)

// checkDeps keeps the shared dependencies of the modules in step. Modules
// with the same go directive require one version of each module they
// share (direct or indirect). A module with a lower go directive may lag
// behind (a newer release can need a newer Go: the root module stays on
// what Go 1.23 builds), never lead: it must not require a version above
// the one the modules with a higher go directive require.
func checkDeps(repo string, log func(string, ...any)) error {
	mods, err := findModules(repo)
	if err != nil {
		return err
	}
	type use struct {
		module, gomod, goVersion, version string
	}
	uses := map[string][]use{}
	for _, m := range mods {
		gv := "v0"
		if m.File.Go != nil {
			gv = "v" + m.File.Go.Version
		}
		for _, r := range m.File.Require {
			if r.Mod.Path == rootPath || strings.HasPrefix(r.Mod.Path, rootPath+"/") {
				continue
			}
			uses[r.Mod.Path] = append(uses[r.Mod.Path], use{m.Path, path.Join(m.Dir, "go.mod"), gv, r.Mod.Version})
		}
	}
	var problems []string
	shared := 0
	var paths []string
	for p := range uses {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		us := uses[p]
		if len(us) < 2 {
			continue
		}
		shared++
		for i, a := range us {
			for _, b := range us[i+1:] {
				c := semver.Compare(a.goVersion, b.goVersion)
				switch {
				case c == 0 && a.version != b.version:
					problems = append(problems, fmt.Sprintf("%s: %s requires %s, %s requires %s (both go %s)",
						p, a.gomod, a.version, b.gomod, b.version, strings.TrimPrefix(a.goVersion, "v")))
				case c < 0 && semver.Compare(a.version, b.version) > 0:
					problems = append(problems, fmt.Sprintf("%s: %s (go %s) requires %s, above %s of %s (go %s)",
						p, a.gomod, strings.TrimPrefix(a.goVersion, "v"), a.version, b.version, b.gomod, strings.TrimPrefix(b.goVersion, "v")))
				case c > 0 && semver.Compare(b.version, a.version) > 0:
					problems = append(problems, fmt.Sprintf("%s: %s (go %s) requires %s, above %s of %s (go %s)",
						p, b.gomod, strings.TrimPrefix(b.goVersion, "v"), b.version, a.version, a.gomod, strings.TrimPrefix(a.goVersion, "v")))
				}
			}
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("shared dependencies out of step (align them with go get in the modules named):\n\t%s", strings.Join(problems, "\n\t"))
	}
	log("dependencies: %d modules shared between modules, one version each per go directive", shared)
	return nil
}
