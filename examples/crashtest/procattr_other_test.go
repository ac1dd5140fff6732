//go:build unix && !linux

package crashtest

import "syscall"

// procAttr: only Linux can tie a child's life to its parent's; elsewhere
// the tests' cleanup kills the servers they started.
func procAttr() *syscall.SysProcAttr { return nil }
