/* Linked into the executables of sanitizer builds only (DILU_SANITIZE with address; see
 * docs/reliability.md). Open MPI loads its components with dlopen and unloads them in
 * MPI_Finalize; LeakSanitizer runs after that and can then neither name those modules nor see
 * the memory that their globals still point to, so it reports hundreds of "leaks" of unknown
 * origin. Keeping every module mapped until exit (dlclose does nothing) lets the leak check see
 * what is really unreachable and name where it came from (tests/sanitize/lsan.supp lists Open
 * MPI's own). dilu itself never unloads a module. */
int dlclose(void* handle);
int dlclose(void* handle) {
  (void)handle;
  return 0;
}
