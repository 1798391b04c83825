package pgtest

import (
	"context"
	"errors"
	"os"
	"time"

	"github.com/testcontainers/testcontainers-go"
	tcpostgres "github.com/testcontainers/testcontainers-go/modules/postgres"
	"github.com/testcontainers/testcontainers-go/wait"
)

// startContainer runs postgres:15 through testcontainers-go, only where a
// Docker engine is reachable (DOCKER_HOST or the default socket).
func startContainer(ctx context.Context) (*Server, error) {
	if os.Getenv("DOCKER_HOST") == "" {
		if _, err := os.Stat("/var/run/docker.sock"); err != nil {
			return nil, errors.New("no Docker engine (no DOCKER_HOST, no /var/run/docker.sock)")
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	c, err := tcpostgres.Run(ctx, "postgres:15",
		tcpostgres.WithUsername("postgres"),
		tcpostgres.WithPassword("postgres"),
		testcontainers.WithCmd("postgres", "-c", "wal_level=logical", "-c", "max_replication_slots=20",
			"-c", "max_wal_senders=20", "-c", "max_connections=200", "-c", "fsync=off"),
		testcontainers.WithWaitStrategy(wait.ForLog("database system is ready to accept connections").
			WithOccurrence(2).WithStartupTimeout(2*time.Minute)),
	)
	if err != nil {
		return nil, err
	}
	dsn, err := c.ConnectionString(ctx, "sslmode=disable")
	if err != nil {
		_ = testcontainers.TerminateContainer(c)
		return nil, err
	}
	return &Server{AdminDSN: dsn, stop: func() { _ = testcontainers.TerminateContainer(c) }}, nil
}
