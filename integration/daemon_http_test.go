package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/shadowctl/shadowctl/internal/daemon"
	"github.com/shadowctl/shadowctl/shadow"
)

// jsonSchema is the subset of JSON Schema that docs/status.schema.json uses.
type jsonSchema struct {
	Type       any                    `json:"type"`
	Required   []string               `json:"required"`
	Properties map[string]*jsonSchema `json:"properties"`
	Items      *jsonSchema            `json:"items"`
	Enum       []any                  `json:"enum"`
	Minimum    *float64               `json:"minimum"`
	Maximum    *float64               `json:"maximum"`
	Format     string                 `json:"format"`
}

func loadSchema(t testing.TB, path string) *jsonSchema {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var s jsonSchema
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return &s
}

func jsonType(v any) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case string:
		return "string"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	case float64:
		if x == float64(int64(x)) {
			return "integer"
		}
		return "number"
	}
	return fmt.Sprintf("%T", v)
}

// validate checks v against s, returning every violation with its path.
func (s *jsonSchema) validate(path string, v any) []string {
	var errs []string
	got := jsonType(v)
	if s.Type != nil {
		var types []string
		switch t := s.Type.(type) {
		case string:
			types = []string{t}
		case []any:
			for _, x := range t {
				types = append(types, x.(string))
			}
		}
		ok := false
		for _, t := range types {
			if t == got || (t == "number" && got == "integer") {
				ok = true
			}
		}
		if !ok {
			return []string{fmt.Sprintf("%s: %s, want %v", path, got, types)}
		}
	}
	if got == "null" {
		return nil
	}
	if len(s.Enum) > 0 {
		found := false
		for _, e := range s.Enum {
			if e == v {
				found = true
			}
		}
		if !found {
			errs = append(errs, fmt.Sprintf("%s: %v not in %v", path, v, s.Enum))
		}
	}
	if f, ok := v.(float64); ok {
		if s.Minimum != nil && f < *s.Minimum || s.Maximum != nil && f > *s.Maximum {
			errs = append(errs, fmt.Sprintf("%s: %v out of range", path, f))
		}
	}
	if str, ok := v.(string); ok && s.Format == "date-time" {
		if _, err := time.Parse(time.RFC3339Nano, str); err != nil {
			errs = append(errs, fmt.Sprintf("%s: %q is not a date-time", path, str))
		}
	}
	if obj, ok := v.(map[string]any); ok {
		for _, r := range s.Required {
			if _, ok := obj[r]; !ok {
				errs = append(errs, fmt.Sprintf("%s: required %q missing", path, r))
			}
		}
		for k, sub := range s.Properties {
			if x, ok := obj[k]; ok {
				errs = append(errs, sub.validate(path+"."+k, x)...)
			}
		}
	}
	if arr, ok := v.([]any); ok && s.Items != nil {
		for i, x := range arr {
			errs = append(errs, s.Items.validate(fmt.Sprintf("%s[%d]", path, i), x)...)
		}
	}
	return errs
}

// validateStatusJSON checks a status object or array against the schema.
func validateStatusJSON(t testing.TB, schema *jsonSchema, raw []byte) int {
	t.Helper()
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatalf("status JSON: %v: %s", err, raw)
	}
	items, ok := v.([]any)
	if !ok {
		items = []any{v}
	}
	for i, it := range items {
		if errs := schema.validate(fmt.Sprintf("$[%d]", i), it); len(errs) > 0 {
			t.Fatalf("status JSON does not validate against docs/status.schema.json:\n%s\n%s", strings.Join(errs, "\n"), raw)
		}
	}
	return len(items)
}

func httpDo(t testing.TB, method, url, token string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func scrape(t testing.TB, base string) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := httpDo(t, "GET", base+"/metrics", "")
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	p := expfmt.NewTextParser(model.LegacyValidation) // the classic Prometheus names
	fams, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v\n%s", err, body)
	}
	return fams
}

func metricValue(f *dto.MetricFamily, labels map[string]string) (float64, bool) {
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.Metric {
		for k, v := range labels {
			found := false
			for _, l := range m.Label {
				if l.GetName() == k && l.GetValue() == v {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		}
	}
	return 0, false
}

// Issue 5, done-when 7: /metrics parses with the Prometheus text parser and
// carries the documented metrics; the status JSON (HTTP and CLI) validates
// against docs/status.schema.json; state-changing endpoints need the token.
func TestDaemonMetricsAndStatusSchema(t *testing.T) {
	shadowctlBinary(t)
	db := newTestDB(t)
	db.createOrders(3000)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		CutoverPolicy: shadow.CutoverAuto, AutoRollback: true, VerifyEvery: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	const token = "s3cret-token"
	d := db.startDaemon(daemon.Config{HTTPAddr: "127.0.0.1:0", Token: token})
	base := "http://" + d.Addr()
	db.waitPhase(m.ID, shadow.CutOver, 60*time.Second)
	var fams map[string]*dto.MetricFamily
	waitTrue(t, 30*time.Second, "a verification after the cutover in /metrics", func() bool {
		fams = scrape(t, base)
		v, _ := metricValue(fams["shadowctl_verifications_total"], map[string]string{"migration": m.ID, "result": "ok"})
		return v >= 1
	})
	for name, labels := range map[string]map[string]string{
		"shadowctl_rows_copied":            {"migration": m.ID},
		"shadowctl_copy_rows_per_second":   {"migration": m.ID},
		"shadowctl_migration_phase":        {"migration": m.ID, "phase": "cut_over"},
		"shadowctl_sync_lag_seconds":       {"migration": m.ID},
		"shadowctl_verifications_total":    {"migration": m.ID, "result": "ok"},
		"shadowctl_cutover_attempts_total": {"migration": m.ID, "result": "ok"},
		"shadowctl_swap_lock_wait_seconds": {"kind": "cutover"},
		"shadowctl_swap_lock_hold_seconds": {"kind": "cutover"},
		"shadowctl_copy_batch_rows_total":  {"migration": m.ID},
		"shadowctl_migration_paused":       {"migration": m.ID},
	} {
		if _, ok := metricValue(fams[name], labels); !ok {
			t.Errorf("/metrics lacks %s%v", name, labels)
		}
	}
	checks := map[string]struct {
		labels map[string]string
		want   float64
	}{
		"shadowctl_rows_copied":            {map[string]string{"migration": m.ID}, 3000},
		"shadowctl_migration_phase":        {map[string]string{"migration": m.ID, "phase": "cut_over"}, 1},
		"shadowctl_sync_lag_seconds":       {map[string]string{"migration": m.ID}, 0},
		"shadowctl_cutover_attempts_total": {map[string]string{"migration": m.ID, "result": "ok"}, 1},
		"shadowctl_swap_lock_hold_seconds": {map[string]string{"kind": "cutover"}, 1}, // one observation
	}
	for name, c := range checks {
		if v, _ := metricValue(fams[name], c.labels); v != c.want {
			t.Errorf("%s%v = %v, want %v", name, c.labels, v, c.want)
		}
	}
	if v, _ := metricValue(fams["shadowctl_migration_phase"], map[string]string{"migration": m.ID, "phase": "copying"}); v != 0 {
		t.Errorf("phase gauge copying = %v, want 0", v)
	}
	if code, _ := httpDo(t, "GET", base+"/healthz", ""); code != 200 {
		t.Fatalf("/healthz: %d", code)
	}

	schema := loadSchema(t, "../docs/status.schema.json")
	code, body := httpDo(t, "GET", base+"/v1/migrations", "")
	if code != 200 || validateStatusJSON(t, schema, body) != 1 {
		t.Fatalf("/v1/migrations: %d %s", code, body)
	}
	env := []string{"SHADOWCTL_DSN=" + db.DSN}
	for _, args := range [][]string{{"status", "--json", m.ID}, {"status", "--json"}, {"list", "--json"}} {
		res := runCLI(t, env, args...)
		if res.Code != 0 {
			t.Fatalf("%v: exit %d: %s", args, res.Code, res.Stderr)
		}
		validateStatusJSON(t, schema, []byte(res.Stdout))
	}

	// State changes need the bearer token.
	pause := base + "/v1/migrations/" + m.ID + "/pause"
	if code, _ := httpDo(t, "POST", pause, ""); code != http.StatusUnauthorized {
		t.Fatalf("pause without a token: %d, want 401", code)
	}
	if code, _ := httpDo(t, "POST", pause, "wrong"); code != http.StatusUnauthorized {
		t.Fatalf("pause with a wrong token: %d, want 401", code)
	}
	code, body = httpDo(t, "POST", pause, token)
	if code != 200 {
		t.Fatalf("pause with the token: %d %s", code, body)
	}
	validateStatusJSON(t, schema, body)
	if !db.migration(m.ID).Paused {
		t.Fatal("not paused after POST pause")
	}
	if evs := db.events(m.ID, "pause"); len(evs) != 1 || !strings.Contains(evs[0].Actor, "http") {
		t.Fatalf("pause events %+v: want one by the HTTP API", evs)
	}
}
