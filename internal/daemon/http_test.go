package daemon

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// Without a token, state-changing endpoints are off; with one, a request
// without it or with another is refused before anything is read.
func TestStateChangingEndpointsNeedToken(t *testing.T) {
	for _, c := range []struct {
		configured, sent string
		want             int
	}{
		{"", "", http.StatusForbidden},
		{"", "anything", http.StatusForbidden},
		{"tok", "", http.StatusUnauthorized},
		{"tok", "tok2", http.StatusUnauthorized},
	} {
		d := &Daemon{cfg: Config{Token: c.configured, Poll: time.Second}, metrics: newMetrics()}
		req := httptest.NewRequest("POST", "/v1/migrations/x/pause", nil)
		if c.sent != "" {
			req.Header.Set("Authorization", "Bearer "+c.sent)
		}
		rec := httptest.NewRecorder()
		d.handler().ServeHTTP(rec, req)
		if rec.Code != c.want {
			t.Errorf("token %q, sent %q: %d, want %d", c.configured, c.sent, rec.Code, c.want)
		}
	}
}

func TestHookEventsOfPhaseChanges(t *testing.T) {
	for _, c := range []struct{ from, to, want string }{
		{"pending", "preparing", "started"},
		{"copying", "verifying", "copy-done"},
		{"verifying", "ready", "verified,ready"},
		{"cutting_over", "cut_over", "cut-over"},
		{"rolling_back", "rolled_back", "rolled-back"},
		{"finalizing", "finalized", "finalized"},
		{"copying", "failed", "failed"},
		{"preparing", "copying", ""},
		{"cut_over", "cutting_over", ""},
	} {
		got := ""
		for i, e := range hookEventsOf(c.from, c.to) {
			if i > 0 {
				got += ","
			}
			got += e
		}
		if got != c.want {
			t.Errorf("%s → %s: %q, want %q", c.from, c.to, got, c.want)
		}
	}
}
