// Package pgcluster finds PostgreSQL server binaries and runs throwaway
// clusters (initdb in a temp folder, wal_level=logical, a free loopback port,
// as the postgres OS user when running as root). Tests, the demo and the
// benchmark harness use it; the postmaster is a direct child with a
// parent-death signal, so it never outlives the process that started it.
package pgcluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// Server is a running cluster.
type Server struct {
	// AdminDSN connects as the superuser postgres to the postgres database.
	AdminDSN string
	// BinDir holds the server binaries (pgbench, psql).
	BinDir string
	// Dir is the cluster's folder (data, socket, server.log).
	Dir  string
	stop func()
}

// Stop shuts the server down (fast shutdown) and removes a temp folder.
func (s *Server) Stop() {
	if s != nil && s.stop != nil {
		s.stop()
	}
}

// FindBinDir locates initdb/postgres: pg_config --bindir, then PATH, then
// /usr/lib/postgresql/<newest>/bin.
func FindBinDir() (string, error) {
	has := func(dir string) bool {
		for _, b := range []string{"initdb", "postgres"} {
			if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
				return false
			}
		}
		return true
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		if d := strings.TrimSpace(string(out)); has(d) {
			return d, nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil && has(filepath.Dir(p)) {
		return filepath.Dir(p), nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	for _, d := range dirs {
		if has(d) {
			return d, nil
		}
	}
	return "", errors.New("no PostgreSQL server binaries (initdb, postgres) found via pg_config, PATH or /usr/lib/postgresql/*/bin")
}

func versionOf(binDir string) float64 {
	v, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(binDir)), 64)
	return v
}

// FreePort asks the kernel for a free loopback TCP port.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Options tune a local throwaway cluster.
type Options struct {
	// Durable keeps fsync on (benchmarks); tests turn it off for speed.
	Durable bool
	// Settings are extra postgresql.conf lines (name = value).
	Settings map[string]string
	// Dir is the folder to create the cluster in; a temp folder when empty.
	Dir string
	// StandbyOf, when set (a primary's DSN, as a superuser), makes the
	// cluster a hot standby streaming from that primary: pg_basebackup -R
	// instead of initdb.
	StandbyOf string
}

// Start initialises and starts a throwaway cluster from binDir. The
// postmaster is a direct child of this process with a parent-death signal, so it
// cannot outlive it.
func Start(ctx context.Context, binDir string, opts Options) (*Server, error) {
	removeStale()
	dir := opts.Dir
	if dir == "" {
		d, err := os.MkdirTemp("", "shadowctl-pg-")
		if err != nil {
			return nil, err
		}
		dir = d
	}
	cred, err := serverCredential()
	if err != nil {
		return nil, err
	}
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			return nil, fmt.Errorf("chown %s to postgres: %w", dir, err)
		}
		if err := os.Chmod(dir, 0o700); err != nil {
			return nil, err
		}
	}
	data := filepath.Join(dir, "data")
	create := exec.CommandContext(ctx, filepath.Join(binDir, "initdb"), "-D", data, "-U", "postgres",
		"--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")
	if opts.StandbyOf != "" {
		// The copy carries the primary's postgresql.conf; the settings
		// appended below (port, socket folder) override it.
		create = exec.CommandContext(ctx, filepath.Join(binDir, "pg_basebackup"), "-D", data, "-d", opts.StandbyOf,
			"-R", "-X", "stream", "--checkpoint=fast", "--no-sync")
	}
	create.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := create.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("%s: %v: %s", filepath.Base(create.Path), err, out)
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	settings := map[string]string{
		"listen_addresses":        "'127.0.0.1'",
		"port":                    strconv.Itoa(port),
		"unix_socket_directories": "'" + dir + "'",
		"wal_level":               "logical",
		"max_replication_slots":   "20",
		"max_wal_senders":         "20",
		"max_connections":         "200",
		"shared_buffers":          "128MB",
		"log_min_messages":        "warning",
		"logging_collector":       "off",
	}
	if !opts.Durable {
		settings["fsync"] = "off"
		settings["synchronous_commit"] = "off"
		settings["full_page_writes"] = "off"
	}
	for k, v := range opts.Settings {
		settings[k] = v
	}
	var conf strings.Builder
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&conf, "%s = %s\n", k, settings[k])
	}
	f, err := os.OpenFile(filepath.Join(data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return nil, err
	}
	_, err = f.WriteString(conf.String())
	f.Close()
	if err != nil {
		return nil, err
	}

	logFile, err := os.Create(filepath.Join(dir, "server.log"))
	if err != nil {
		return nil, err
	}
	if cred != nil {
		_ = logFile.Chown(int(cred.Uid), int(cred.Gid))
	}
	// The parent-death signal is bound to the starting thread: keep this
	// goroutine on one thread so a Go thread exiting cannot kill the server.
	runtime.LockOSThread()
	pm := exec.Command(filepath.Join(binDir, "postgres"), "-D", data)
	pm.Stdout, pm.Stderr = logFile, logFile
	// SIGQUIT is PostgreSQL's immediate shutdown: children exit with it.
	pm.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGQUIT, Setpgid: true}
	if err := pm.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	exited := make(chan struct{})
	go func() { _ = pm.Wait(); close(exited) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			_ = pm.Process.Signal(syscall.SIGINT) // fast shutdown
			select {
			case <-exited:
			case <-time.After(20 * time.Second):
				_ = syscall.Kill(-pm.Process.Pid, syscall.SIGKILL)
				<-exited
			}
			logFile.Close()
			if opts.Dir == "" {
				os.RemoveAll(dir)
			}
		})
	}
	srv := &Server{
		AdminDSN: fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port),
		BinDir:   binDir,
		Dir:      dir,
		stop:     stop,
	}
	if err := waitReady(ctx, srv.AdminDSN, exited); err != nil {
		stop()
		log, _ := os.ReadFile(filepath.Join(dir, "server.log"))
		return nil, fmt.Errorf("postgres did not become ready: %w\n%s", err, log)
	}
	return srv, nil
}

// removeStale deletes the folders of earlier throwaway clusters whose
// process was killed before it could clean up (their server died with it).
func removeStale() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "shadowctl-pg-*"))
	for _, d := range dirs {
		pidFile, err := os.ReadFile(filepath.Join(d, "data", "postmaster.pid"))
		if err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(pidFile), "\n", 2)[0])); err == nil && syscall.Kill(pid, 0) == nil {
				continue // still running
			}
		}
		// A folder without a pid file may be a cluster that another process
		// is creating right now: leave young ones alone.
		if info, err := os.Stat(d); err != nil || (len(pidFile) == 0 && time.Since(info.ModTime()) < 10*time.Minute) {
			continue
		}
		_ = os.RemoveAll(d)
	}
}

func waitReady(ctx context.Context, dsn string, exited <-chan struct{}) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := pgx.Connect(ctx, dsn)
		if err == nil {
			c.Close(ctx)
			return nil
		}
		select {
		case <-exited:
			return errors.New("postgres exited")
		default:
		}
		if time.Now().After(deadline) {
			return err
		}
		// Polling a server that is starting up: there is nothing to wait on.
		time.Sleep(50 * time.Millisecond)
	}
}

// serverCredential returns the postgres user's credential when running as root
// (PostgreSQL refuses to run as root), else nil.
func serverCredential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root and there is no postgres OS user to run the server as: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}
