package crashtest

import "syscall"

// procAttr makes the kernel kill a server the test started if the test
// process dies first (a timeout panic, say), so that none is left behind.
func procAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
