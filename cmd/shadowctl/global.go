package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/mattn/go-isatty"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/catalog"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/urfave/cli/v2"
)

func globalFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "dsn", EnvVars: []string{"SHADOWCTL_DSN", "DATABASE_URL"},
			Usage: "PostgreSQL connection string (URL or key=value); libpq PG* variables fill what it leaves out"},
		&cli.StringFlag{Name: "catalog-schema", Value: catalog.DefaultSchema, EnvVars: []string{"SHADOWCTL_CATALOG_SCHEMA"},
			Usage: "schema holding shadowctl's catalog"},
		&cli.StringFlag{Name: "log-level", Value: "info", EnvVars: []string{"SHADOWCTL_LOG_LEVEL"},
			Usage: "debug, info, warn or error"},
		&cli.StringFlag{Name: "log-format", EnvVars: []string{"SHADOWCTL_LOG_FORMAT"},
			Usage: "console or json (default: console on a terminal, json otherwise)"},
	}
}

// dsnOf returns the DSN the operator gave (may be empty: pgx then reads PG*).
func dsnOf(c *cli.Context) string { return c.String("dsn") }

// catalogOf returns the catalog named by --catalog-schema.
func catalogOf(c *cli.Context) catalog.Catalog { return catalog.New(c.String("catalog-schema")) }

// redactAll removes any password found in a --dsn argument or the DSN
// environment variables from s.
func redactAll(s string, args []string) string {
	var dsns []string
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, "--dsn="); ok {
			dsns = append(dsns, v)
		} else if (a == "--dsn" || a == "-dsn") && i+1 < len(args) {
			dsns = append(dsns, args[i+1])
		}
	}
	for _, env := range []string{"SHADOWCTL_DSN", "DATABASE_URL"} {
		if v := os.Getenv(env); v != "" {
			dsns = append(dsns, v)
		}
	}
	for _, d := range dsns {
		s = pgsql.Redact(s, d)
	}
	if pw := os.Getenv("PGPASSWORD"); pw != "" {
		s = strings.ReplaceAll(s, pw, "xxxxx")
	}
	return s
}

// connConfig parses the DSN; the error never shows the password.
func connConfig(c *cli.Context) (*pgx.ConnConfig, error) {
	dsn := dsnOf(c)
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, pgsql.RedactError(fmt.Errorf("bad --dsn: %w", err), dsn)
	}
	if cfg.RuntimeParams["application_name"] == "" {
		cfg.RuntimeParams["application_name"] = "shadowctl"
	}
	return cfg, nil
}

// connect opens one dedicated connection.
func connect(c *cli.Context) (*pgx.Conn, error) {
	cfg, err := connConfig(c)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(c.Context, 30*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, pgsql.RedactError(fmt.Errorf("connect to %s: %w", describeTarget(cfg), err), dsnOf(c))
	}
	return conn, nil
}

// pool opens a connection pool of at most size connections.
func pool(c *cli.Context, size int32) (*pgxpool.Pool, error) {
	cfg, err := connConfig(c)
	if err != nil {
		return nil, err
	}
	pcfg, err := pgxpool.ParseConfig("")
	if err != nil {
		return nil, err
	}
	pcfg.ConnConfig = cfg
	pcfg.MaxConns = size
	p, err := pgxpool.NewWithConfig(c.Context, pcfg)
	if err != nil {
		return nil, pgsql.RedactError(fmt.Errorf("connect to %s: %w", describeTarget(cfg), err), dsnOf(c))
	}
	ctx, cancel := context.WithTimeout(c.Context, 30*time.Second)
	defer cancel()
	if err := p.Ping(ctx); err != nil {
		p.Close()
		return nil, pgsql.RedactError(fmt.Errorf("connect to %s: %w", describeTarget(cfg), err), dsnOf(c))
	}
	return p, nil
}

func describeTarget(cfg *pgx.ConnConfig) string {
	return fmt.Sprintf("host=%s port=%d user=%s database=%s", cfg.Host, cfg.Port, cfg.User, cfg.Database)
}

// logger builds the zerolog logger from --log-level and --log-format.
func logger(c *cli.Context) zerolog.Logger {
	return newLogger(c.App.ErrWriter, c.String("log-level"), c.String("log-format"))
}

func newLogger(w io.Writer, level, format string) zerolog.Logger {
	lvl, err := zerolog.ParseLevel(strings.ToLower(level))
	if err != nil || level == "" {
		lvl = zerolog.InfoLevel
	}
	if format == "" {
		format = "json"
		if f, ok := w.(*os.File); ok && isatty.IsTerminal(f.Fd()) {
			format = "console"
		}
	}
	if format == "console" {
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: "15:04:05"}
	}
	return zerolog.New(w).Level(lvl).With().Timestamp().Logger()
}
