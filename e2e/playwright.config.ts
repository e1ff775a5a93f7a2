import { defineConfig } from '@playwright/test';

/**
 * End-to-end tests of the replichat browser app. Every test starts its own three-replica cluster of the real
 * release binary (see fixtures/cluster.ts) and drives the app in headless Chromium, one browser context per
 * user. Browsers are not downloaded: the system Chromium is used (scripts/e2e.sh installs it).
 *
 * Environment:
 * - CHROMIUM_PATH: the Chromium executable (default /usr/bin/chromium).
 * - REPLICHAT_BIN: the replichat binary (default <repo>/target/release/replichat).
 * - REPLICHAT_E2E_STATIC: the directory the replicas serve the app from (default <repo>/static).
 * - REPLICHAT_E2E_LOG: the replicas' --log filter (default info).
 * - REPLICHAT_E2E_KEEP=1: keep each test's directory (node logs, SQLite files) even when it passes.
 */
export default defineConfig({
  testDir: './tests',
  // Two cores: one test (three replicas and two or three browser contexts) at a time.
  workers: 1,
  fullyParallel: false,
  forbidOnly: !!process.env.CI,
  retries: 0,
  timeout: 60_000,
  expect: { timeout: 10_000 },
  reporter: [['list']],
  outputDir: './test-results',
  use: {
    viewport: { width: 1280, height: 800 },
    actionTimeout: 15_000,
    navigationTimeout: 20_000,
    trace: 'retain-on-failure',
    screenshot: 'only-on-failure',
    launchOptions: {
      executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--disable-quic',
        '--no-first-run',
      ],
    },
  },
});
