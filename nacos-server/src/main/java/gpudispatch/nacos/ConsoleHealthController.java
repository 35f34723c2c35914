package gpudispatch.nacos;

import com.alibaba.nacos.config.server.service.repository.PersistService;
import com.alibaba.nacos.naming.cluster.ServerStatus;
import com.alibaba.nacos.naming.cluster.ServerStatusManager;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.http.HttpStatus;
import org.springframework.http.ResponseEntity;
import org.springframework.web.bind.annotation.GetMapping;
import org.springframework.web.bind.annotation.RequestMapping;
import org.springframework.web.bind.annotation.RestController;

/**
 * The console module's health endpoints, at the same paths ({@code /nacos/v1/console/health/...}).
 * Readiness is 200 only when the config store answers (as in the console), the naming module
 * reports UP (stricter than the console, which only calls the naming metrics endpoint) and the
 * initial admin user, when one is configured, is in place ({@link AdminBootstrap}).
 */
@RestController("consoleHealthController")
@RequestMapping("/v1/console/health")
public class ConsoleHealthController {

    @Autowired
    private PersistService persistService;

    @Autowired
    private ServerStatusManager serverStatusManager;

    @Autowired
    private AdminBootstrap adminBootstrap;

    @GetMapping("/liveness")
    public ResponseEntity<String> liveness() {
        return ResponseEntity.ok("OK");
    }

    @GetMapping("/readiness")
    public ResponseEntity<String> readiness() {
        try {
            persistService.configInfoCount("");
        } catch (Exception e) {
            return ResponseEntity.status(HttpStatus.INTERNAL_SERVER_ERROR).body("Config is not in readiness: " + e);
        }
        ServerStatus naming = serverStatusManager.getServerStatus();
        if (naming != ServerStatus.UP) {
            return ResponseEntity.status(HttpStatus.INTERNAL_SERVER_ERROR).body("Naming is not in readiness: " + naming);
        }
        if (!adminBootstrap.ready()) {
            return ResponseEntity.status(HttpStatus.INTERNAL_SERVER_ERROR)
                    .body("Auth is not in readiness: the admin user is not set up yet (" + adminBootstrap.lastFailure() + ")");
        }
        return ResponseEntity.ok("OK");
    }
}
