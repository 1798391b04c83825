// Package pgtest gives tests a real PostgreSQL: one throwaway cluster per test
// package (started from TestMain) and one fresh database per test.
//
// Where the server comes from, in order:
//  1. SHADOWCTL_TEST_DSN: an existing server the tests may create databases on;
//  2. local server binaries (pg_config --bindir, PATH, /usr/lib/postgresql/*/bin),
//     started as a throwaway cluster in a temp folder with wal_level=logical on a
//     free loopback port, as the `postgres` OS user when running as root;
//  3. testcontainers-go's postgres module, where a Docker engine is reachable.
//
// With CI=true, finding none of them is a failure, never a skip. The cluster is
// started as a direct child with a parent-death signal, so it dies with the test
// binary even when a test panics or the binary is killed.
package pgtest

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/shadowctl/shadowctl/internal/pgcluster"
)

// Server is a PostgreSQL server the tests may create databases on.
type Server struct {
	// AdminDSN connects as a superuser to the maintenance database.
	AdminDSN string
	// BinDir holds the server binaries (pgbench, psql) when known.
	BinDir string
	stop   func()
	n      atomic.Int64
}

// ClusterOptions tune a local throwaway cluster (see pgcluster.Options).
type ClusterOptions = pgcluster.Options

// FindBinDir locates the server binaries (see pgcluster.FindBinDir).
func FindBinDir() (string, error) { return pgcluster.FindBinDir() }

// FreePort asks the kernel for a free loopback TCP port.
func FreePort() (int, error) { return pgcluster.FreePort() }

// StartCluster starts a throwaway cluster (see pgcluster.Start).
func StartCluster(ctx context.Context, binDir string, opts ClusterOptions) (*Server, error) {
	c, err := pgcluster.Start(ctx, binDir, opts)
	if err != nil {
		return nil, err
	}
	return &Server{AdminDSN: c.AdminDSN, BinDir: c.BinDir, stop: c.Stop}, nil
}

// StartStandby starts a throwaway hot standby streaming from primary (a
// cluster started by StartCluster), with extra settings.
func StartStandby(ctx context.Context, primary *Server, settings map[string]string) (*Server, error) {
	return StartCluster(ctx, primary.BinDir, ClusterOptions{StandbyOf: primary.AdminDSN, Settings: settings})
}

func startLocal(ctx context.Context, binDir string) (*Server, error) {
	return StartCluster(ctx, binDir, ClusterOptions{})
}

var (
	current   *Server
	currentMu sync.Mutex
)

// Main is the body of a test package's TestMain: it starts a server, runs the
// tests and stops the server whatever happened, then exits with the tests' code.
func Main(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	srv, err := Start(context.Background())
	if err != nil {
		if os.Getenv("CI") == "true" {
			fmt.Fprintf(os.Stderr, "pgtest: no PostgreSQL for the tests (CI=true makes this a failure): %v\n", err)
			return 1
		}
		fmt.Fprintf(os.Stderr, "pgtest: no PostgreSQL for the tests, they will skip: %v\n"+
			"  install the server packages (apt-get install -y postgresql) or set SHADOWCTL_TEST_DSN\n", err)
	}
	currentMu.Lock()
	current = srv
	currentMu.Unlock()
	defer func() {
		if srv != nil {
			srv.Stop()
		}
	}()
	return m.Run()
}

// Current returns the package's server, failing (under CI) or skipping the test
// when there is none.
func Current(t testing.TB) *Server {
	t.Helper()
	currentMu.Lock()
	srv := current
	currentMu.Unlock()
	if srv == nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("pgtest: no PostgreSQL server (did TestMain call pgtest.Main?)")
		}
		t.Skip("pgtest: no PostgreSQL server available")
	}
	return srv
}

// Stop shuts the server down (a no-op for an external one).
func (s *Server) Stop() {
	if s != nil && s.stop != nil {
		s.stop()
	}
}

// Start finds or starts a server in the documented order.
func Start(ctx context.Context) (*Server, error) {
	if dsn := os.Getenv("SHADOWCTL_TEST_DSN"); dsn != "" {
		return &Server{AdminDSN: dsn, BinDir: findBinDirOrEmpty()}, nil
	}
	binDir, binErr := FindBinDir()
	if binErr == nil {
		return startLocal(ctx, binDir)
	}
	if srv, err := startContainer(ctx); err == nil {
		return srv, nil
	} else {
		return nil, fmt.Errorf("%v; docker: %v", binErr, err)
	}
}

func findBinDirOrEmpty() string {
	d, _ := FindBinDir()
	return d
}

// NewDatabase creates a fresh database for the test, dropped when it ends, and
// returns its DSN.
func NewDatabase(t testing.TB) string {
	t.Helper()
	srv := Current(t)
	ctx := context.Background()
	name := fmt.Sprintf("t_%d_%d", os.Getpid(), srv.n.Add(1))
	admin, err := pgx.Connect(ctx, srv.AdminDSN)
	if err != nil {
		t.Fatalf("pgtest: connect admin: %v", err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	dsn := withDatabase(srv.AdminDSN, name)
	t.Cleanup(func() {
		c, err := pgx.Connect(ctx, srv.AdminDSN)
		if err != nil {
			return
		}
		defer c.Close(ctx)
		_, _ = c.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
	})
	return dsn
}

// NewPool creates a fresh database and a pool on it, closed when the test ends.
func NewPool(t testing.TB) (*pgxpool.Pool, string) {
	t.Helper()
	dsn := NewDatabase(t)
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		t.Fatalf("pgtest: pool: %v", err)
	}
	cfg.MaxConns = 20 // like the CLI's pools: the runner, the sync and the verifier share it
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatalf("pgtest: pool: %v", err)
	}
	t.Cleanup(pool.Close)
	return pool, dsn
}

func withDatabase(dsn, db string) string {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return dsn
	}
	return fmt.Sprintf("postgres://%s@%s:%d/%s?sslmode=disable", cfg.User, cfg.Host, cfg.Port, db)
}
