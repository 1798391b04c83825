package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// bareSlot is the bare consumer's slot and publication.
const bareSlot = "bench_bare_consumer"

// bareConsumer starts PostgreSQL's own logical consumer, pg_recvlogical,
// reading pgoutput for orders on a slot of its own into /dev/null: the
// stream with nothing applied. The issue puts its cost to the workload at
// "about 13 %"; measured in the same run, it is the floor under logical
// sync's sync_tps_ratio. It returns once the slot is being read; stop ends
// the consumer and drops its slot and publication, and fails when the
// consumer had exited early (the window then measured nothing).
func (b *bench) bareConsumer(ctx context.Context) (stop func() error, err error) {
	drop := func(ctx context.Context) {
		_, _ = b.pool.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1`, bareSlot)
		_, _ = b.pool.Exec(ctx, `DROP PUBLICATION IF EXISTS `+bareSlot)
	}
	drop(ctx)
	if _, err := b.pool.Exec(ctx, `CREATE PUBLICATION `+bareSlot+` FOR TABLE public.orders`); err != nil {
		return nil, fmt.Errorf("bare consumer: %w", err)
	}
	if _, err := b.pool.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, bareSlot); err != nil {
		drop(ctx)
		return nil, fmt.Errorf("bare consumer: %w", err)
	}
	cmd := exec.Command(b.srv.BinDir+"/pg_recvlogical", "-d", b.dsn, "--slot", bareSlot, "--start",
		"-o", "proto_version=1", "-o", "publication_names="+bareSlot, "-f", "/dev/null")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		drop(ctx)
		return nil, fmt.Errorf("bare consumer: start pg_recvlogical: %w", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	stop = func() error {
		var err error
		select {
		case <-exited: // it should have been reading all along
			err = fmt.Errorf("bare consumer: pg_recvlogical exited before the window ended: %s", strings.TrimSpace(stderr.String()))
		default:
			_ = cmd.Process.Signal(syscall.SIGINT)
			<-exited
		}
		_ = os.WriteFile(filepath.Join(b.work, "pg_recvlogical.err"), stderr.Bytes(), 0o644)
		drop(context.WithoutCancel(ctx))
		return err
	}
	deadline := time.Now().Add(10 * time.Second)
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		var active bool
		if err := b.pool.QueryRow(ctx, `SELECT active FROM pg_replication_slots WHERE slot_name = $1`, bareSlot).Scan(&active); err == nil && active {
			return stop, nil
		}
		if time.Now().After(deadline) {
			return nil, errors.Join(fmt.Errorf("bare consumer: pg_recvlogical did not start reading within 10 s"), stop())
		}
		select {
		case <-ctx.Done():
			_ = stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

// plainTrigger puts, for one window, the issue's "plain row trigger that
// upserts into green" in the place of trigger sync's triggers: one function
// for every event, no SECURITY DEFINER, no fixed search_path, no wait for
// the copy's key buckets, the bench's columns written as they are. It keeps
// green as current as the real sync does (the workload deletes nothing, and
// a delete is applied too), so the cutover after it finds green exact. The
// issue puts that trigger's cost at "about 16 %"; measured in the same run,
// it is what trigger sync's sync_tps_ratio compares with. The swap is one
// transaction each way (sync's triggers disabled, the plain one created;
// then the reverse), so no write goes unsynced; restore puts it back.
func (b *bench) plainTrigger(ctx context.Context) (restore func() error, err error) {
	var names []string
	if err := b.pool.QueryRow(ctx, `SELECT coalesce(array_agg(quote_ident(tgname::text) ORDER BY tgname), '{}') FROM pg_trigger
		WHERE tgrelid = 'public.orders'::regclass AND NOT tgisinternal AND tgenabled <> 'D' AND tgname LIKE 'shadowctl\_fwd\_%'`).Scan(&names); err != nil {
		return nil, fmt.Errorf("plain trigger: find trigger sync's triggers on public.orders: %w", err)
	}
	if len(names) == 0 {
		return nil, errors.New("plain trigger: trigger sync has no trigger on public.orders")
	}
	swap := func(ctx context.Context, enable bool) error {
		verb, plain := "DISABLE", `CREATE TRIGGER bench_plain_upsert AFTER INSERT OR UPDATE OR DELETE ON public.orders FOR EACH ROW EXECUTE FUNCTION public.bench_plain_upsert()`
		if enable {
			verb, plain = "ENABLE", `DROP TRIGGER bench_plain_upsert ON public.orders`
		}
		stmts := []string{pgsql.LocalLockTimeoutSQL(5 * time.Second), plain}
		for _, n := range names {
			stmts = append(stmts, "ALTER TABLE public.orders "+verb+" TRIGGER "+n)
		}
		return pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error { return pgsql.ExecPipelined(ctx, tx, stmts) })
	}
	if _, err := b.pool.Exec(ctx, `CREATE OR REPLACE FUNCTION public.bench_plain_upsert() RETURNS trigger LANGUAGE plpgsql AS $plain$
BEGIN
  IF TG_OP = 'DELETE' THEN
    DELETE FROM green.orders WHERE id = OLD.id;
    RETURN NULL;
  END IF;
  INSERT INTO green.orders (id, customer_id, customer_name, amount, status, created_at)
  VALUES (NEW.id, NEW.customer_id, NEW.customer_name, NEW.amount, NEW.status, NEW.created_at)
  ON CONFLICT (id) DO UPDATE SET customer_id = EXCLUDED.customer_id, customer_name = EXCLUDED.customer_name,
    amount = EXCLUDED.amount, status = EXCLUDED.status, created_at = EXCLUDED.created_at;
  RETURN NULL;
END
$plain$`); err != nil {
		return nil, fmt.Errorf("plain trigger: %w", err)
	}
	if err := swap(ctx, false); err != nil {
		return nil, fmt.Errorf("plain trigger: put it in place of trigger sync's: %w", err)
	}
	return func() error {
		if err := swap(context.WithoutCancel(ctx), true); err != nil {
			return fmt.Errorf("plain trigger: put trigger sync's triggers back: %w", err)
		}
		return nil
	}, nil
}
